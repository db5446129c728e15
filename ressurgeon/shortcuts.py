"""The shortcut modules the rewrite inserts, and the one recogniser for them in any graph.

A shortcut joins a span's output ``h`` with its input ``x``. The module owns
its algebra: ``terms()`` lists what it adds (which operand, through the
projection or not, times the gate or not), ``forward`` computes exactly that
sum, and ``formula`` is the text reports print. Every other stage (fold, the
gate report, diagnostics, plots) asks the module instead of re-deriving it.

``find_shortcuts(gm)`` finds our shortcuts as module calls and as the plain
ops torch.export inlines them into (recognised by the ``nn_module_stack`` it
records); ``lift_shortcuts(gm)`` turns inlined ones back into module calls,
so a model read back from a ``.pt2`` trains and folds like the one add_skips
returned. A new kind of shortcut adds its class to ``SHORTCUT_TYPES`` with its
own ``from_inlined`` recogniser, here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import fx

from ._fx import attr, node_order
from .config import Init
from .errors import ConfigError
from .registry import Trait, lookup


@dataclass(frozen=True)
class Term:
    """One addend of a shortcut: ``coef * proj(operand)`` with each part optional."""

    operand: str         # "h" (the span's output) or "x" (its input)
    projected: bool      # passes through ``module.proj``
    coef: str | None     # None (1), or a coefficient ``module.coefficient(coef)`` computes

    @property
    def gated(self) -> bool:
        return self.coef is not None


_TERMS = {
    Init.PRESERVE: (Term("h", False, None), Term("x", True, "gate")),
    Init.STANDARD: (Term("h", False, None), Term("x", True, None)),
    Init.REZERO: (Term("x", True, None), Term("h", False, "gate")),
    Init.MORPH: (Term("h", False, "keep"), Term("x", True, "ramp")),
}


class Shortcut(nn.Module):
    """Joins a span's output ``h`` with a shortcut ``S(x)`` from the span's input ``x``.

    init "preserve": ``h + gate * S(x)``, gate = 0, the model computes what it did;
    init "standard": ``h + S(x)``, the classic residual block;
    init "rezero":   ``S(x) + gate * h``, gate = 0, the span starts as identity;
    init "morph":    ``(1 - ramp + gate) * h + ramp * S(x)``, gate = ramp = 0: the model
                     computes what it did, and as training ramps ``ramp`` (a buffer) to 1
                     (``ressurgeon.training.ShortcutRamp``) the block becomes rezero's.

    ``proj`` is ``nn.Identity`` for identity shortcuts, a 1x1 ConvNd or a Linear
    for projections; its weights are PyTorch's default init (never zero, so a
    zero gate still receives a gradient).

    Example:
        >>> s = Shortcut("preserve")
        >>> h, x = torch.ones(2, 3), torch.full((2, 3), 5.0)
        >>> torch.equal(s(h, x), h)
        True
    """

    def __init__(self, init: str | Init, proj: nn.Module | None = None):
        super().__init__()
        try:
            self.init = Init(init)
        except ValueError:
            raise ConfigError(f"unknown shortcut init {init!r}; one of "
                             f"{', '.join(i.value for i in Init)}") from None
        self.proj = proj if proj is not None else nn.Identity()
        if self.init is Init.STANDARD:
            self.register_parameter("gate", None)
        else:
            self.gate = nn.Parameter(torch.zeros(()))
        if self.init is Init.MORPH:
            self.register_buffer("ramp", torch.zeros(()))

    @property
    def kind(self) -> str:
        return "identity" if isinstance(self.proj, nn.Identity) else "projection"

    @property
    def formula(self) -> str:
        return self.init.formula

    def terms(self) -> tuple[Term, ...]:
        """What ``forward`` adds, in order."""
        return _TERMS[self.init]

    def coefficient(self, name: str) -> torch.Tensor:
        """A term's coefficient: the gate, the ramp, or what morph keeps of h (1 - ramp + gate)."""
        if name == "gate":
            return self.gate
        if name == "ramp":
            return self.ramp
        return 1 - self.ramp + self.gate  # "keep"

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        operands = {"h": h, "x": x}
        total = None
        for term in self.terms():
            value = operands[term.operand]
            if term.projected:
                value = self.proj(value)
            if term.coef is not None:
                value = self.coefficient(term.coef) * value
            total = value if total is None else total + value
        return total

    def extra_repr(self) -> str:
        return f"init={self.init.value!r}"

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> "ShortcutSite | None":
        """Recognise ``add(A, mul(gate, B))`` or ``add(A, B)`` that torch.export inlined from one.

        The projection is a conv/linear reading ``{path}.proj.weight``; x is what
        it reads. Without one, which operand is x follows from one fact: the
        span's output h is computed from x, so x comes first in graph order.
        """
        inside = set(nodes)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        externals = _external_inputs(nodes)
        if len(outputs) != 1 or len(externals) != 2:
            return None
        out = outputs[0]
        if lookup(out.target) is None or Trait.ADD not in lookup(out.target).traits:
            return None
        gate = proj = ramp = None
        x = None
        for node in nodes:
            if node.op == "get_attr" and str(node.target) == f"{path}.gate":
                gate = node
            if node.op == "get_attr" and str(node.target) == f"{path}.ramp":
                ramp = node
            info = lookup(node.target) if node.op == "call_function" else None
            if info is not None and Trait.LIFTABLE in info.traits and len(node.args) > 1 \
                    and isinstance(node.args[1], fx.Node) \
                    and str(node.args[1].target) == f"{path}.proj.weight":
                proj, x = node, node.args[0]
        order = node_order(gm.graph)
        if x is None and ramp is not None:  # morph: x is what the ramp multiplies
            scaled = [a for u in ramp.users if u in inside for a in u.args
                      if isinstance(a, fx.Node) and a in externals]
            x = scaled[0] if len(scaled) == 1 else None
        if x is None:
            x = min(externals, key=order.__getitem__)
        if x not in externals:
            return None
        h = next(e for e in externals if e is not x)
        if ramp is not None and gate is not None:
            init = Init.MORPH
        elif gate is None:
            init = Init.STANDARD
        else:
            mul = next(iter(gate.users)) if len(gate.users) == 1 else None
            if mul is None or mul not in inside:
                return None
            scaled = [a for a in mul.args if isinstance(a, fx.Node) and a is not gate]
            if len(scaled) != 1:
                return None
            init = Init.PRESERVE if scaled[0] in (x, proj) else Init.REZERO
        module = cls(init, _projection_from_graph(gm, proj))
        if gate is not None:
            module.gate = attr(gm, gate.target)
        if ramp is not None:
            module.ramp = attr(gm, ramp.target)
        return ShortcutSite(path=path, module=module, node=out, h=h, x=x, inlined=tuple(nodes))


def _external_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """Tensors a group of nodes reads from outside the group (parameters excluded)."""
    inside = set(nodes)
    found: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                found[a] = None
    return list(found)


def _projection_from_graph(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    """The 1x1 conv or Linear module an inlined projection call computes, sharing its weight."""
    if node is None:
        return None
    weight = attr(gm, node.args[1].target)
    info = lookup(node.target)
    if info.spatial_dims == 0:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        stride = node.args[3] if len(node.args) > 3 else 1
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[info.spatial_dims]
        module = conv(weight.shape[1], weight.shape[0], kernel_size=1, stride=stride, bias=False)
    module.weight = weight
    return module


def build_projection(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
                     channel_axis: int, stride: int) -> nn.Module:
    """A 1x1 projection that maps a tensor of src_shape onto dst_shape.

    Channels-first tensors of rank 3-5 get a (strided) 1x1 ConvNd, as in ResNet's
    option B; features-last tensors (and rank-2 [B, F]) get a Linear on the last dim.
    """
    rank = len(src_shape)
    if channel_axis == 1 and rank >= 3:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank]
        return conv(src_shape[1], dst_shape[1], kernel_size=1, stride=stride, bias=False)
    if stride != 1:
        raise ValueError("a features-last projection cannot change spatial size")
    return nn.Linear(src_shape[-1], dst_shape[-1], bias=False)


# Every kind of shortcut module, by the qualified name torch.export records for it.
SHORTCUT_TYPES: dict[str, type[nn.Module]] = {
    f"{Shortcut.__module__}.{Shortcut.__qualname__}": Shortcut,
}


def shortcut_type(cls) -> type[nn.Module] | None:
    """Our shortcut class for a class or the qualified name torch.export records; else None."""
    if isinstance(cls, type):
        return cls if issubclass(cls, tuple(SHORTCUT_TYPES.values())) else None
    return SHORTCUT_TYPES.get(cls)


def is_shortcut(module: object) -> bool:
    return isinstance(module, tuple(SHORTCUT_TYPES.values()))


def exported_shortcut_path(node: fx.Node) -> str | None:
    """The shortcut module path an inlined (torch.export'ed) fx node came from, if any.

    torch.export flattens shortcut modules into plain ops but records the
    module stack in ``node.meta["nn_module_stack"]``; the innermost shortcut
    on it is the one the node belongs to.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if shortcut_type(cls) is not None:
            return path
    return None


@dataclass(frozen=True)
class ShortcutSite:
    """One shortcut in a graph: its module, the node whose value is the sum, and its operands.

    ``inlined`` holds the plain ops torch.export made of it (empty for a module
    call); ``module`` is then rebuilt from them, sharing the graph's tensors.
    """

    path: str
    module: nn.Module
    node: fx.Node
    h: fx.Node
    x: fx.Node
    inlined: tuple[fx.Node, ...] = field(default=())


def find_shortcuts(gm: fx.GraphModule) -> list[ShortcutSite]:
    """Every shortcut of ours in ``gm``, module calls and torch.export-inlined ones, in graph order.

    Args:
        gm: any GraphModule (from add_skips, trace_model, or a loaded ``.pt2``).

    Returns:
        One ShortcutSite per shortcut; ``gm`` is not modified.

    Example:
        >>> [s.path for s in find_shortcuts(add_skips(model, (x,)).module)]  # doctest: +SKIP
        ['skip_0__4', 'skip_4__8']
    """
    modules = dict(gm.named_modules())
    sites: list[ShortcutSite] = []
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and is_shortcut(module):
            if len(node.args) == 2:
                sites.append(ShortcutSite(path=str(node.target), module=module, node=node,
                                          h=node.args[0], x=node.args[1]))
            continue
        path = exported_shortcut_path(node)
        if path is not None:
            groups.setdefault(path, []).append(node)
    for path, nodes in groups.items():
        cls = shortcut_type(_innermost_class(nodes[0], path))
        for a in {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}:
            nodes.append(a)  # the group's parameters, for the recogniser
        site = cls.from_inlined(gm, path, nodes) if cls is not None else None
        if site is not None:
            sites.append(site)
    order = node_order(gm.graph)
    return sorted(sites, key=lambda s: order[s.node])


def _innermost_class(node: fx.Node, path: str):
    for p, cls in (node.meta.get("nn_module_stack") or {}).values():
        if p == path:
            return cls
    return None


def lift_shortcuts(gm: fx.GraphModule) -> int:
    """Turn torch.export-inlined shortcuts back into module calls; return how many.

    Each shortcut becomes a call of its module again at its old path, holding
    the very same parameters, so gates keep their names (``skip_*.gate``) and
    the model trains and folds like the one add_skips returned.
    """
    lifted = 0
    for site in find_shortcuts(gm):
        if not site.inlined:
            continue
        gm.add_submodule(site.path, site.module)
        with gm.graph.inserting_after(site.node):
            call = gm.graph.call_module(site.path, (site.h, site.x))
        call.meta = dict(site.node.meta)
        site.node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
        lifted += 1
    if lifted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return lifted


__all__ = ["Shortcut", "Term", "ShortcutSite", "find_shortcuts", "lift_shortcuts",
           "build_projection", "exported_shortcut_path", "is_shortcut", "SHORTCUT_TYPES"]
