"""fold, step 5: absorb scalar gates into conv/linear weights by rescaling.

Every tensor is stored as ``true / s`` for a scalar ``s`` (1 unless said
otherwise). A conv or linear absorbs any ``s`` of its input in its weights and
may choose the ``s`` of its output (``W' = W s_in / s_out``, ``b' = b / s_out``).
ReLU-like ops and max-pooling pass a positive ``s`` (``f(s x) = s f(x)``,
s > 0); reshapes, average pooling and means pass any ``s``. A gate Mul
``a * v`` is dropped by letting its output carry ``s = a * s_v``; a sum needs
both sides at one ``s``, which a side can take when it comes from a conv or
linear that only this sum reads. So ``h + a*x`` becomes ``h' + x`` with h's
conv scaled by 1/a and the sum stored at scale a until the next conv takes it
back — exact up to float rounding.

A gate whose scale would reach an op that needs true values (the model
output, LayerNorm, softmax, a negative scale into a ReLU) stays a Mul; the
pass reports why. It runs to the first such op, keeps the gates that caused
it, and starts again, so each reason is the real one. What an op passes is
read from the registry's traits (``POSITIVE_HOMOGENEOUS``, ``LINEAR_IN_INPUT``,
``CAT``, ``METADATA_ONLY``, ``SCALABLE``), so ``register_op`` extends it.
"rescaling stuck" (an AssertionError) is an internal invariant: a bug, exit 1.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .._fx import call_counts, editable_layer, node_order, set_param
from ..registry import Trait, op_info, scalable_modules

# Largest factor (either way) by which a stored activation may differ from the
# true one: past it, rescaling could overflow or lose precision in that dtype.
MAX_SCALE = {torch.float16: 2.0 ** 4, torch.bfloat16: 2.0 ** 16}
DEFAULT_MAX_SCALE = 2.0 ** 20


class _Blocked(Exception):
    def __init__(self, culprits: frozenset, why: str):
        super().__init__(why)
        self.culprits, self.why = culprits, why


def absorb_gates(gm: fx.GraphModule, gates: dict[fx.Node, float], sums: set[fx.Node],
                 dtype: torch.dtype = torch.float32) -> dict[fx.Node, str]:
    """Rescale weights so that gate Muls become no-ops, and remove those Muls.

    Args:
        gm: the graph, edited in place (weights get new Parameters).
        gates: ``operator.mul(v, a)`` nodes and their factor ``a``.
        sums: the ``operator.add`` nodes of shortcuts (both sides must agree on a scale).
        dtype: the model's dtype, which bounds how far a stored tensor may be scaled.

    Returns:
        The gate Muls that stay, each with the reason.
    """
    limit = MAX_SCALE.get(dtype, DEFAULT_MAX_SCALE)
    kept: dict[fx.Node, str] = {}
    while True:
        solver = _Solver(gm, gates, kept, sums, limit)
        try:
            solver.run()
            break
        except _Blocked as blocked:
            fresh = blocked.culprits - kept.keys()
            if not fresh:
                raise AssertionError(f"rescaling stuck: {blocked.why}") from None
            for mul in fresh:
                kept[mul] = blocked.why
    solver.apply()
    return kept


class _Solver:
    def __init__(self, gm, gates, kept, sums, limit):
        self.gm, self.gates, self.kept, self.sums, self.limit = gm, gates, kept, sums, limit
        self.modules, self.calls = dict(gm.named_modules()), call_counts(gm)
        self.scalable = scalable_modules()
        self.order = node_order(gm.graph)
        self.scale: dict[fx.Node, float] = {}
        self.origin: dict[fx.Node, frozenset] = {}   # the gate Muls that made s != 1

    def scale_of(self, n) -> float:
        return self.scale.get(n, 1.0) if isinstance(n, fx.Node) else 1.0

    def origins_of(self, n) -> frozenset:
        return self.origin.get(n, frozenset()) if isinstance(n, fx.Node) else frozenset()

    def traits(self, node: fx.Node) -> frozenset:
        info = op_info(node, self.modules)
        return info.traits if info is not None else frozenset()

    def latest(self, gates) -> frozenset:
        """Keep the last gate before a blocker: its Mul can undo all earlier scales at once."""
        return frozenset([max(gates, key=self.order.__getitem__)]) if gates else frozenset()

    def layer(self, node: fx.Node):
        return editable_layer(node, self.modules, self.calls, self.scalable)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            traits = self.traits(node)
            first = node.args[0] if node.args else None
            if node in self.gates:
                factor = 1.0 if node in self.kept else self.gates[node]
                extra = frozenset() if node in self.kept else frozenset({node})
                self.scale[node], self.origin[node] = factor * self.scale_of(first), self.origins_of(first) | extra
            elif self.layer(node) is not None:
                pass  # takes its input's scale into its weights; its own is 1 unless a sum chose one
            elif node in self.sums:
                self._join(node)
            elif Trait.METADATA_ONLY in traits:
                continue
            elif Trait.CAT in traits and isinstance(first, (list, tuple)):
                self._concat(node, [t for t in first if isinstance(t, fx.Node)])
            elif traits & {Trait.POSITIVE_HOMOGENEOUS, Trait.LINEAR_IN_INPUT}:
                if isinstance(first, fx.Node):
                    positive_only = Trait.LINEAR_IN_INPUT not in traits
                    if self.scale_of(first) < 0 and positive_only:
                        negative = [m for m in self.origins_of(first) if self.gates[m] < 0]
                        raise _Blocked(self.latest(negative), f"a negative gate cannot pass "
                                       f"{node.name} (ReLU and max-pooling need a positive scale)")
                    self.scale[node], self.origin[node] = self.scale_of(first), self.origins_of(first)
            else:
                for arg in node.all_input_nodes:
                    if self.scale_of(arg) != 1.0:
                        where = "the model output" if node.op == "output" else \
                            f"{node.name} ({_op_label(node, self.modules)})"
                        raise _Blocked(self.latest(self.origins_of(arg)), f"its scale would reach "
                                       f"{where}, which needs the true values")
            if not 1 / self.limit <= abs(self.scale_of(node)) <= self.limit:
                raise _Blocked(self.latest(self.origins_of(node)), f"rescaling would change activations more than "
                               f"{self.limit:g}x at {node.name}")

    def _concat(self, node: fx.Node, parts: list[fx.Node]) -> None:
        origin = frozenset().union(*(self.origins_of(p) for p in parts))
        scales = [self.scale_of(p) for p in parts]
        if any(not math.isclose(x, scales[0], rel_tol=1e-12) for x in scales):
            raise _Blocked(self.latest(origin), f"the inputs of {node.name} (cat) would carry "
                           "different scales")
        self.scale[node], self.origin[node] = scales[0] if scales else 1.0, origin

    def _join(self, node: fx.Node) -> None:
        a, b = node.args
        sa, sb = self.scale_of(a), self.scale_of(b)
        self.origin[node] = self.origins_of(a) | self.origins_of(b)
        if math.isclose(sa, sb, rel_tol=1e-12):
            self.scale[node] = sa
            return
        # prefer bringing the other side to 1: the stream's scale resets
        tries = [(b, a), (a, b)] if sa == 1.0 else [(a, b), (b, a)]
        why = []
        for side, other in tries:
            steps, stop = self._chain(side, self.scale_of(other))
            if steps is not None:
                for n, t in steps:
                    self.scale[n] = t
                self.scale[node] = self.scale_of(other)
                return
            why.append(stop)
        own = frozenset(n for n in (a, b) if n in self.gates and n not in self.kept)
        raise _Blocked(own or self.latest(self.origin[node]), f"neither side of the sum "
                       f"{node.name} can take its scale ({'; '.join(why)})")

    def _chain(self, start: fx.Node, target: float):
        """Nodes from ``start`` back to a conv/linear or kept Mul that can carry ``target``."""
        steps, node, t = [], start, target
        while True:
            if len(node.users) != 1:
                return None, f"{node.name} is also read elsewhere"
            steps.append((node, t))
            if node in self.gates:
                if node in self.kept:
                    return steps, None
                t, node = t / self.gates[node], node.args[0]
                continue
            if self.layer(node) is not None:
                return steps, None
            traits = self.traits(node)
            if Trait.LINEAR_IN_INPUT in traits or Trait.POSITIVE_HOMOGENEOUS in traits and t > 0:
                node = node.args[0]
                continue
            if Trait.POSITIVE_HOMOGENEOUS in traits:
                return None, f"{node.name} needs a positive scale"
            return None, f"{node.name} ({_op_label(node, self.modules)}) cannot absorb a scale"

    def apply(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            layer = self.layer(node)
            if layer is not None:
                s_in, s_out = self.scale_of(node.args[0]), self.scale_of(node)
                if s_in != 1.0 or s_out != 1.0:
                    set_param(layer, "weight", layer.weight.double() * (s_in / s_out), layer.weight)
                    if layer.bias is not None:
                        set_param(layer, "bias", layer.bias.double() / s_out, layer.weight)
            elif node in self.gates:
                x = node.args[0]
                factor = self.gates[node] * self.scale_of(x) / self.scale_of(node)
                if math.isclose(factor, 1.0, rel_tol=1e-12):
                    node.replace_all_uses_with(x)
                    graph.erase_node(node)
                else:
                    node.args = (x, factor)


def _op_label(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return type(modules.get(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))
