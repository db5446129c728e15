"""Part of the fold stage: absorb scalar gates into conv/linear weights by rescaling.

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
it, and starts again, so each reason is the real one.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# Largest factor (either way) by which a stored activation may differ from the
# true one: past it, rescaling could overflow or lose precision in that dtype.
MAX_SCALE = {torch.float16: 2.0 ** 4, torch.bfloat16: 2.0 ** 16}
DEFAULT_MAX_SCALE = 2.0 ** 20

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_MODULES = (*CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# f(s*x) = s*f(x) for s > 0
POSITIVE = {nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
            F.relu, torch.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
            aten.relu.default, aten.leaky_relu.default, aten.max_pool1d.default,
            aten.max_pool2d.default, aten.max_pool3d.default, "relu"}
# linear in their first argument: any s passes
LINEAR_OPS = {nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
              nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
              torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
              torch.unsqueeze, torch.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
              operator.getitem, "view", "reshape", "flatten", "permute", "transpose",
              "contiguous", "squeeze", "unsqueeze", "mean",
              aten.view.default, aten.reshape.default, aten.flatten.using_ints,
              aten.permute.default, aten.transpose.int, aten.squeeze.dim,
              aten.unsqueeze.default, aten.clone.default, aten.mean.dim,
              aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
              aten.adaptive_avg_pool1d.default, aten._adaptive_avg_pool2d.default}
# concatenations: any s, when every input carries the same
CONCAT = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}
# read only a tensor's metadata
META_OPS = {"size", "dim", getattr, aten.sym_size.int}


def op_key(node: fx.Node, modules: dict[str, nn.Module]):
    """The table key of a node: its module's class, function or method name."""
    if node.op == "call_module":
        return type(modules.get(node.target))
    return node.target if node.op in ("call_function", "call_method") else None


def in_table(key, table) -> bool:
    try:
        return key in table
    except TypeError:  # unhashable target
        return False


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def editable_layer(node: fx.Node, modules: dict, calls: dict,
                   types: tuple = LINEAR_MODULES) -> nn.Module | None:
    """The module of a conv/linear call whose weights we may edit (called once, one argument)."""
    if node.op != "call_module" or calls.get(node.target, 0) != 1 or len(node.args) != 1:
        return None
    module = modules.get(node.target)
    return module if isinstance(module, types) else None


def set_param(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Give ``module.name`` a new Parameter (never edit one another module may share)."""
    setattr(module, name, nn.Parameter(value.to(like.dtype).detach().clone(),
                                       requires_grad=like.requires_grad))


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
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.scale: dict[fx.Node, float] = {}
        self.origin: dict[fx.Node, frozenset] = {}   # the gate Muls that made s != 1

    def s(self, n) -> float:
        return self.scale.get(n, 1.0) if isinstance(n, fx.Node) else 1.0

    def o(self, n) -> frozenset:
        return self.origin.get(n, frozenset()) if isinstance(n, fx.Node) else frozenset()

    def latest(self, gates) -> frozenset:
        """Keep the last gate before a blocker: its Mul can undo all earlier scales at once."""
        return frozenset([max(gates, key=self.order.__getitem__)]) if gates else frozenset()

    def layer(self, node: fx.Node):
        return editable_layer(node, self.modules, self.calls)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            key = op_key(node, self.modules)
            first = node.args[0] if node.args else None
            if node in self.gates:
                factor = 1.0 if node in self.kept else self.gates[node]
                extra = frozenset() if node in self.kept else frozenset({node})
                self.scale[node], self.origin[node] = factor * self.s(first), self.o(first) | extra
            elif self.layer(node) is not None:
                pass  # takes its input's scale into its weights; its own is 1 unless a sum chose one
            elif node in self.sums:
                self._join(node)
            elif in_table(key, META_OPS):
                continue
            elif in_table(key, CONCAT) and isinstance(first, (list, tuple)):
                self._concat(node, [t for t in first if isinstance(t, fx.Node)])
            elif in_table(key, POSITIVE) or in_table(key, LINEAR_OPS):
                if isinstance(first, fx.Node):
                    if self.s(first) < 0 and in_table(key, POSITIVE):
                        negative = [m for m in self.o(first) if self.gates[m] < 0]
                        raise _Blocked(self.latest(negative), f"a negative gate cannot pass "
                                       f"{node.name} (ReLU and max-pooling need a positive scale)")
                    self.scale[node], self.origin[node] = self.s(first), self.o(first)
            else:
                for arg in node.all_input_nodes:
                    if self.s(arg) != 1.0:
                        where = "the model output" if node.op == "output" else \
                            f"{node.name} ({getattr(key, '__name__', key)})"
                        raise _Blocked(self.latest(self.o(arg)), f"its scale would reach "
                                       f"{where}, which needs the true values")
            if not 1 / self.limit <= abs(self.s(node)) <= self.limit:
                raise _Blocked(self.latest(self.o(node)), f"rescaling would change activations more than "
                               f"{self.limit:g}x at {node.name}")

    def _concat(self, node: fx.Node, parts: list[fx.Node]) -> None:
        origin = frozenset().union(*(self.o(p) for p in parts))
        scales = [self.s(p) for p in parts]
        if any(not math.isclose(x, scales[0], rel_tol=1e-12) for x in scales):
            raise _Blocked(self.latest(origin), f"the inputs of {node.name} (cat) would carry "
                           "different scales")
        self.scale[node], self.origin[node] = scales[0] if scales else 1.0, origin

    def _join(self, node: fx.Node) -> None:
        a, b = node.args
        sa, sb = self.s(a), self.s(b)
        self.origin[node] = self.o(a) | self.o(b)
        if math.isclose(sa, sb, rel_tol=1e-12):
            self.scale[node] = sa
            return
        # prefer bringing the other side to 1: the stream's scale resets
        tries = [(b, a), (a, b)] if sa == 1.0 else [(a, b), (b, a)]
        why = []
        for side, other in tries:
            steps, stop = self._chain(side, self.s(other))
            if steps is not None:
                for n, t in steps:
                    self.scale[n] = t
                self.scale[node] = self.s(other)
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
            key = op_key(node, self.modules)
            if in_table(key, LINEAR_OPS) or in_table(key, POSITIVE) and t > 0:
                node = node.args[0]
                continue
            if in_table(key, POSITIVE):
                return None, f"{node.name} needs a positive scale"
            return None, f"{node.name} ({getattr(key, '__name__', key)}) cannot absorb a scale"

    def apply(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            layer = self.layer(node)
            if layer is not None:
                s_in, s_out = self.s(node.args[0]), self.s(node)
                if s_in != 1.0 or s_out != 1.0:
                    set_param(layer, "weight", layer.weight.double() * (s_in / s_out), layer.weight)
                    if layer.bias is not None:
                        set_param(layer, "bias", layer.bias.double() / s_out, layer.weight)
            elif node in self.gates:
                x = node.args[0]
                factor = self.gates[node] * self.s(x) / self.s(node)
                if math.isclose(factor, 1.0, rel_tol=1e-12):
                    node.replace_all_uses_with(x)
                    graph.erase_node(node)
                else:
                    node.args = (x, factor)
