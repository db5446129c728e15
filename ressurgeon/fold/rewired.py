"""fold, step 1b: rewired blocks (``rewire``'s DWA, hyper-connections) still at their initial
values go back to the plain residual.

A rewired model captured into a graph (``trace_model``, or a ``.pt2`` torch.export wrote) holds
no wrapper modules any more: torch.export inlines them, recording each op's module stack in
``node.meta["nn_module_stack"]``. A wrapper's class is the one its rewiring (registered in
``ressurgeon.catalog.REWIRINGS``) names as ``Rewiring.wrapper``; its ops are the *site* of the
block: ``own`` (what the wrapper computes itself: the average, the stream mixing) and
``inner`` (the original block's sublayers, under ``<path>.block``). The data crossing between
the two is all a rewiring needs to say how it folds back, whatever ops torch chose:

- ``into_inner``: the wrapper's values the block reads (hyper: each sublayer's input x);
- ``from_inner``: the block's values the wrapper reads (dwa: the block output Y; hyper: each
  sublayer's output y);
- ``from_outside`` / ``to_outside``: what enters the wrapper from before it and leaves it.

Each kind decides which of its sites fold (``Rewiring.fold_graph``: at init, and exact given
the others) and rewrites them; this step only finds the sites and hands them to their kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

import torch
from torch import fx

from .._fx import node_order
from ..catalog import REWIRINGS

__all__ = ["RewireSite", "FoldedRewire", "RewireOutcome", "find_rewired", "fold_rewirings",
           "rewiring_kinds", "is_rewired_module"]


class RewireOutcome(StrEnum):
    """What fold did with a rewired block."""

    REMOVED = "removed"   # at init: the plain residual computes the same; its ops are gone
    KEPT = "kept"         # the new parameters stay; ``reason`` says why


@dataclass
class FoldedRewire:
    """What fold did with one rewired block (``name``: its path, ``blocks.2``)."""

    name: str
    kind: str
    outcome: RewireOutcome
    reason: str | None = None
    params: int = 0               # the new parameters it had

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewireSite:
    """One rewired block in a captured graph (see the module docstring)."""

    path: str
    kind: str
    index: int
    own: list[fx.Node]
    params: dict[str, torch.Tensor]            # the new parameters, by name in the wrapper
    order: dict[fx.Node, int] = field(default_factory=dict, repr=False)   # the graph's order

    def __post_init__(self) -> None:
        self._own_set = set(self.own)

    @property
    def inner_prefix(self) -> str:
        """The path of the original block inside the wrapper."""
        return f"{self.path}.block"

    def is_own(self, node: fx.Node) -> bool:
        return node in self._own_set

    def is_inner(self, node: fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(isinstance(p, str) and (p == self.inner_prefix
                                           or p.startswith(self.inner_prefix + "."))
                   for p, _ in stack.values())

    def into_inner(self) -> list[fx.Node]:
        """The wrapper's tensors that the block's ops read, in graph order."""
        return self._sorted({n for n in self.own for u in n.users
                             if self.is_inner(u) and _tensor(n)})

    def from_inner(self) -> list[fx.Node]:
        """The block's tensors that the wrapper's ops read, in graph order."""
        return self._sorted({a for n in self.own for a in n.all_input_nodes
                             if self.is_inner(a) and _tensor(a)})

    def from_outside(self) -> list[fx.Node]:
        """Tensors from before the block (not parameters, not sizes) that the wrapper's ops
        read."""
        return self._sorted({a for n in self.own for a in n.all_input_nodes
                             if a.op != "get_attr" and not self.is_own(a)
                             and not self.is_inner(a) and _tensor(a)})

    def to_outside(self) -> list[fx.Node]:
        """The wrapper's tensors read after the block (by later blocks or the model)."""
        return self._sorted({n for n in self.own for u in n.users
                             if not self.is_own(u) and not self.is_inner(u) and _tensor(n)})

    def readers(self, node: fx.Node) -> list[fx.Node]:
        """The nodes outside this wrapper's own ops that read ``node``."""
        return [u for u in node.users if not self.is_own(u)]

    def _sorted(self, nodes: set[fx.Node]) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)

    def erase(self, gm: fx.GraphModule) -> None:
        """Erase the wrapper's own ops (none may be read from outside any more)."""
        for node in reversed(self.own):
            if node.users:
                raise RuntimeError(f"{self.path}: {node.format_node()} is still read by "
                                   f"{[u.name for u in node.users]}")
            gm.graph.erase_node(node)
        self.own = []
        self._own_set = set()

    @property
    def param_count(self) -> int:
        return sum(t.numel() for t in self.params.values())


def _tensor(node: fx.Node) -> bool:
    """A tensor value (or one of unknown type), not a size or a shape."""
    val = node.meta.get("val", node.meta.get("example_value"))
    return val is None or isinstance(val, torch.Tensor)


def rewiring_kinds() -> dict[str, object]:
    """Each registered rewiring (an instance of its class), by the qualified name of the
    wrapper class torch.export records in ``nn_module_stack``."""
    found = {}
    for entry in list(REWIRINGS.values()):
        kind = entry.load()()
        cls = kind.wrapper
        found[f"{cls.__module__}.{cls.__qualname__}"] = kind
    return found


def is_rewired_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a wrapper of a registered rewiring."""
    names = set(rewiring_kinds())
    return any(f"{type(m).__module__}.{type(m).__qualname__}" in names
               for m in module.modules())


def find_rewired(gm: fx.GraphModule) -> list[RewireSite]:
    """Every rewired block in ``gm`` (inlined by torch.export), in graph order.

    A node belongs to the innermost wrapper on its module stack unless it lies inside that
    wrapper's original block.
    """
    kinds = rewiring_kinds()
    if not kinds:
        return []
    groups: dict[str, list[fx.Node]] = {}
    kind_of: dict[str, str] = {}
    first: dict[str, int] = {}   # where each block's ops begin (its own or its block's)
    for position, node in enumerate(gm.graph.nodes):
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        for depth in range(len(stack) - 1, -1, -1):
            path, cls = stack[depth]
            if isinstance(cls, str) and cls in kinds and isinstance(path, str):
                first.setdefault(path, position)
                if depth == len(stack) - 1:   # the wrapper's own op, not its block's
                    groups.setdefault(path, []).append(node)
                    kind_of[path] = kinds[cls].name
                else:
                    kind_of.setdefault(path, kinds[cls].name)
                    groups.setdefault(path, [])
                break
    if not groups:
        return []
    order = node_order(gm.graph)
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    sites = []
    for path, own in groups.items():
        inner = f"{path}.block."
        params = {name[len(path) + 1:]: t for name, t in tensors.items()
                  if name.startswith(path + ".") and not name.startswith(inner)}
        index = path.rsplit(".", 1)[-1]
        sites.append(RewireSite(path=path, kind=kind_of[path],
                                index=int(index) if index.isdigit() else -1,
                                own=sorted(own, key=order.__getitem__), params=params,
                                order=order))
    return sorted(sites, key=lambda s: first[s.path])


def fold_rewirings(gm: fx.GraphModule) -> list[FoldedRewire]:
    """Fold back the rewired blocks of ``gm`` whose kind says they may go (in place).

    Each kind gets its own sites (``Rewiring.fold_graph``), rewrites those still at their
    initial values into the plain residual, and reports every site: removed, or kept with
    the reason. Parameters nothing reads any more are deleted by fold afterwards.
    """
    sites = find_rewired(gm)
    if not sites:
        return []
    kinds = {k.name: k for k in rewiring_kinds().values()}
    records: list[FoldedRewire] = []
    for name in dict.fromkeys(s.kind for s in sites):
        records += kinds[name].fold_graph(gm, [s for s in sites if s.kind == name])
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    order = {s.path: i for i, s in enumerate(sites)}
    return sorted(records, key=lambda r: order.get(r.name, len(order)))
