"""The addition join (ResNet, Transformer sublayers): ``h + S(x)`` in four inits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import fx

from .._fx import attr, node_order
from ..config import Init
from ..errors import ConfigError
from ..registry import Trait, lookup
from ._graph import ShortcutSite, _projection_from_graph, group_ends
from .base import JoinModule, fit_spatial, gated, strided


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


class Shortcut(JoinModule):
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

    join_name = "add"
    # measured: README "Surgery on a trained network" (morph's gate learns slower)
    gate_lr_scales = {"preserve": 1.0, "rezero": 1.0, "morph": 0.3}

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
                if strided(self.proj):  # odd sizes: ceil(H/s) cropped to the span's size
                    value = fit_spatial(value, h)
            if term.coef is not None:  # a zero coefficient drops its term, inf included
                value = gated(self.coefficient(term.coef), value)
            total = value if total is None else total + value
        return total

    def extra_repr(self) -> str:
        return f"init={self.init.value!r}"

    def constructor_args(self) -> tuple[tuple, dict]:
        return (self.init.value, self.proj), {}

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> "ShortcutSite | None":
        """Recognise ``add(A, mul(gate, B))`` or ``add(A, B)`` that torch.export inlined from one.

        The projection is a conv/linear reading ``{path}.proj.weight``; x is what
        it reads. Without one, which operand is x follows from one fact: the
        span's output h is computed from x, so x comes first in graph order.
        """
        ends = group_ends(nodes)
        if ends is None:
            return None
        (out, externals), inside = ends, set(nodes)
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
            scaled = [_unguarded(a) for u in ramp.users if u in inside for a in u.args
                      if isinstance(a, fx.Node) and _unguarded(a) in externals]
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
            muls = [u for u in gate.users if "mul" in getattr(u.target, "__name__", "")]
            mul = muls[0] if len(muls) == 1 else None
            if mul is None or mul not in inside:
                return None
            scaled = [_unguarded(a) for a in mul.args if isinstance(a, fx.Node) and a is not gate]
            if len(scaled) != 1:
                return None
            init = Init.PRESERVE if scaled[0] in (x, proj) else Init.REZERO
        module = cls(init, _projection_from_graph(gm, proj))
        if gate is not None:
            module.gate = attr(gm, gate.target)
        if ramp is not None:
            module.ramp = attr(gm, ramp.target)
        return ShortcutSite(path=path, module=module, node=out, h=h, x=x, inlined=tuple(nodes))


def _unguarded(node: fx.Node) -> fx.Node:
    """The value a ``gated`` guard reads (``where(isfinite(v) | (g != 0), v, 0)`` -> v), through
    the crops ``fit_spatial`` adds after a strided projection (``slice``/``narrow``)."""
    while node.op == "call_function" and len(node.args) > 1:
        name = getattr(node.target, "__name__", "")
        if name.startswith("where") and isinstance(node.args[1], fx.Node):
            node = node.args[1]
        elif name.split(".")[0] in ("slice", "narrow") and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
    return node
