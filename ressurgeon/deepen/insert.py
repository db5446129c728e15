"""deepen, rewrite: insert the chosen new blocks into a traced graph.

Each new block is a submodule ``deepen_<position>`` of the GraphModule, and its computation
is inlined into the graph right after the position, as ordinary nodes: the analysis, fold,
``torch.export`` and the ONNX exporter see ordinary layers and one residual add, and a ``.pt2``
round trip keeps the block's parameters under the same names (``deepen_blocks_1.fc2.weight``).

- copy: the block's nodes are copied, reading the block's output instead of its input, and
  their modules and tensors are cloned into the new submodule; the tensors that end each
  residual branch (``Position.zero``) are set to zero in the clone. A span our own shortcut
  closed is copied with a plain residual add as its join (whatever the original's gate).
- new: a ``ResidualLayer`` (``x + out(act(norm(layer(x))))``, ``out`` zero) is built to the
  width and kernel found at the position and inlined from its own fx trace, so its
  ``forward`` is the one statement of what the block computes.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import fx

from .._fx import META, attr, free_name, info, op_name
from ..analysis.layers import GraphAnalysis
from ..skips.rewrite import name_part
from ..shortcuts import is_shortcut
from ..shortcuts.base import finite_or_zero
from .positions import Position

torch.fx.wrap("finite_or_zero")  # one node in the block's trace, like the copies' guard

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
                "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "hardswish": nn.Hardswish,
                "mish": nn.Mish}


class ResidualLayer(nn.Module):
    """``x + out(act(norm(layer(x))))``: the block ``deepen`` inserts into a plain network.

    ``layer`` and ``out`` have the width (and, for convolutions, the kernel) found where the
    block goes; ``out`` starts at zero, so the block is exactly the identity while ``out``'s
    weights still receive a gradient (``act(norm(layer(x)))`` is not zero). ``out`` reads
    non-finite values as 0 (``finite_or_zero``), so the identity is exact for inf inputs too.

    Example:
        >>> block = ResidualLayer(nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU())
        >>> _ = nn.init.zeros_(block.out.weight), nn.init.zeros_(block.out.bias)
        >>> x = torch.randn(2, 4)
        >>> torch.equal(block(x), x)
        True
    """

    def __init__(self, layer: nn.Module, out: nn.Module, act: nn.Module,
                 norm: nn.Module | None = None):
        super().__init__()
        self.layer, self.norm, self.act, self.out = layer, norm, act, out

    def constructor_args(self) -> tuple[tuple, dict]:
        """What ``save_code`` passes to the constructor to rebuild this module."""
        return (self.layer, self.out, self.act), {"norm": self.norm}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if self.norm is not None:
            h = self.norm(h)
        # out reads inf/NaN as 0: out is zero at insertion, and 0 * inf would be NaN
        return x + self.out(finite_or_zero(self.act(h)))


@dataclass(frozen=True)
class NewBlock:
    """One block ``deepen`` inserted.

    ``name`` is its module path in the deepened model (train it alone with
    ``freeze_except(model, [name])``); ``after`` the position it follows; ``zeroed`` the
    tensors set to zero (by their names in the deepened model); ``params`` its parameter count.
    """

    name: str
    how: str                         # "copy" | "new"
    after: str
    zeroed: tuple[str, ...]
    params: int
    shape: tuple[int, ...] | None
    layer: str = ""                  # new: what was built, e.g. "Conv2d 3x3, 16 channels"
    input: str = ""                  # the graph node it reads (graph results only)
    output: str = ""                 # its last node

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("input")
        data.pop("output")
        return data


def insert_blocks(gm: fx.GraphModule, analysis: GraphAnalysis,
                  positions: list[Position]) -> list[NewBlock]:
    """Insert one new block after each of ``positions`` (a position may repeat); edits ``gm``.

    Blocks go in from the last position to the first, so a copy always reads nodes that no
    earlier insertion has moved; a repeated position gets its blocks in a chain.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    positions = sorted(positions, key=lambda p: order[analysis.nodes[p.output]])
    names = _names(gm, positions)
    as_text = any(isinstance(v[1], str) for n in gm.graph.nodes
                  for v in (n.meta.get("nn_module_stack") or {}).values())
    made = []
    for pos, name in reversed(list(zip(positions, names))):
        insert = _insert_copy if pos.how == "copy" else _insert_new
        made.append(insert(gm, analysis, pos, name, as_text))
    gm.graph.lint()
    gm.recompile()
    return list(reversed(made))


def _names(gm: fx.GraphModule, positions: list[Position]) -> list[str]:
    taken: set[str] = set()
    names = []
    for pos in positions:
        base = f"deepen_{name_part(pos.name)}"
        name, i = base, 1
        while name in taken or hasattr(gm, name):
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        names.append(name)
    return names


def _insert_copy(gm: fx.GraphModule, analysis: GraphAnalysis, pos: Position, name: str,
                 as_text: bool) -> NewBlock:
    nodes = analysis.nodes
    region = [nodes[n] for n in pos.nodes]
    x, y = nodes[pos.input], nodes[pos.output]
    container = copy.deepcopy(gm.get_submodule(pos.module)) if pos.module else nn.Module()
    gm.add_submodule(name, container)

    def rename(target: str) -> str:
        rel = target[len(pos.module) + 1:] if pos.module and target.startswith(pos.module + ".") \
            else name_part(target)
        return f"{name}.{rel}"

    env: dict[fx.Node, fx.Node] = {x: y}
    made: list[fx.Node] = []
    anchor = y
    for node in region:
        if node.op == "call_module" and is_shortcut(analysis.modules[node.target]):
            h, skip = node.args[:2]   # the copy joins with a plain residual add
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_function(operator.add, (env.get(h, h), env.get(skip, skip)))
            new.meta = dict(node.meta)
        else:
            if node.op in ("call_module", "get_attr"):
                _clone_into(gm, str(node.target), rename(str(node.target)))
            with gm.graph.inserting_after(anchor):
                new = gm.graph.node_copy(node, lambda a: env.get(a, a))
            if node.op in ("call_module", "get_attr"):
                new.target = rename(str(node.target))
        new.meta["nn_module_stack"] = _stack(node, name, type(container), pos.module, as_text)
        env[node] = anchor = new
        made.append(new)
    out = env[y]
    inside = set(made)
    y.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    called = {str(n.target) for n in region if n.op == "call_module"}
    zeroed = tuple(f"{rename(owner)}.{leaf}" if (owner := t.rpartition(".")[0]) in called
                   else rename(t) for t in pos.zero for leaf in [t.rpartition(".")[2]])
    with torch.no_grad():
        for tensor in zeroed:
            attr(gm, tensor).zero_()
    _guard_zeroed_inputs(gm, made, set(zeroed))
    return NewBlock(name=name, how="copy", after=pos.name, zeroed=zeroed,
                    params=sum(p.numel() for p in gm.get_submodule(name).parameters()),
                    shape=pos.shape, input=y.name, output=out.name)


def _clone_into(gm: fx.GraphModule, source: str, target: str) -> None:
    """Clone the module or tensor at ``source`` to ``target`` unless the container holds it."""
    try:
        gm.get_submodule(target)
        return
    except AttributeError:
        pass
    owner, _, leaf = target.rpartition(".")
    try:
        if hasattr(gm.get_submodule(owner), leaf):
            return
    except AttributeError:
        pass
    value = attr(gm, source)
    if isinstance(value, nn.Module):
        gm.add_submodule(target, copy.deepcopy(value))
        return
    holder = _holder(gm, owner)
    if isinstance(value, nn.Parameter):
        holder.register_parameter(leaf, nn.Parameter(value.detach().clone(),
                                                     requires_grad=value.requires_grad))
    else:
        holder.register_buffer(leaf, value.detach().clone())


def _holder(gm: fx.GraphModule, path: str) -> nn.Module:
    """The module at ``path``, made (empty modules) where missing."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        gm.add_submodule(path, nn.Module())
        return gm.get_submodule(path)


def _stack(node: fx.Node, name: str, cls: type, module: str, as_text: bool) -> dict:
    """The module stack a copied or new node records: the new block, then what it holds
    (class names as text where the graph's own stacks hold text: a torch.export graph)."""

    def entry(path: str, kind) -> tuple[str, object]:
        return path, (f"{kind.__module__}.{kind.__qualname__}" if as_text and isinstance(kind, type)
                      else kind)

    stack = {name: entry(name, cls)}
    for key, (path, kind) in (node.meta.get("nn_module_stack") or {}).items():
        if module and path.startswith(module + "."):
            new = f"{name}.{path[len(module) + 1:]}"
            stack[new] = entry(new, kind)
    return stack

def _guard_zeroed_inputs(gm: fx.GraphModule, made: list[fx.Node], zeroed: set[str]) -> None:
    """Each layer owning a zeroed tensor reads its input through ``finite_or_zero``.

    A zeroed weight times an inf (or NaN) input is NaN, not 0: without the guard a copy
    would turn an input the original mapped to a finite output into NaN. The guard
    replaces non-finite entries by 0, so the layer outputs exactly 0 at insertion.
    """
    owners = {t.rpartition(".")[0] for t in zeroed}
    for node in made:
        reads_zero = (node.op == "call_module" and str(node.target) in owners) or (
            node.op == "call_function" and any(
                isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in zeroed
                for a in node.args[1:]))
        if not reads_zero or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        with gm.graph.inserting_before(node):
            guard = gm.graph.call_function(finite_or_zero, (node.args[0],))
        guard.meta = dict(node.args[0].meta)
        node.update_arg(0, guard)


# -- new residual layers --------------------------------------------------------------------------

def build_layer(analysis: GraphAnalysis, pos: Position) -> tuple[ResidualLayer, str]:
    """The ResidualLayer for a position (out zeroed), and a short description of it."""
    lay = next(lay for lay in analysis.layers if lay.name == pos.name)
    value = info(analysis.nodes[pos.output])
    width = pos.width
    if pos.kernel:
        conv = _CONV[len(pos.kernel)]
        padding = tuple(k // 2 for k in pos.kernel) if all(k % 2 for k in pos.kernel) else "same"
        layer, out = (conv(width, width, pos.kernel, padding=padding) for _ in range(2))
        what = f"{conv.__name__} {'x'.join(map(str, pos.kernel))}, {width} channels"
    else:
        layer, out = nn.Linear(width, width), nn.Linear(width, width)
        what = f"Linear, {width} features"
    norm = None
    if lay.has_norm:
        node = analysis.nodes[lay.pre_act]
        if node.op == "call_module":
            norm = copy.deepcopy(analysis.modules[node.target])
            for reset in ("reset_parameters", "reset_running_stats"):
                if hasattr(norm, reset):
                    getattr(norm, reset)()
    act = _activation(analysis, lay)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    block = ResidualLayer(layer, out, act, norm).to(device=value.device, dtype=value.dtype)
    return block, what


def _activation(analysis: GraphAnalysis, lay) -> nn.Module:
    """The neighbour's activation (a fresh copy), else ReLU: a block needs a non-linearity."""
    if lay.out == lay.pre_act:
        return nn.ReLU()
    node = analysis.nodes[lay.out]
    if node.op == "call_module":
        act = copy.deepcopy(analysis.modules[node.target])
        if getattr(act, "inplace", False):
            act.inplace = False
        return act
    return _ACTIVATIONS.get(op_name(node, analysis.modules).lower().rstrip("_"), nn.ReLU)()


def _insert_new(gm: fx.GraphModule, analysis: GraphAnalysis, pos: Position, name: str,
                as_text: bool) -> NewBlock:
    x = analysis.nodes[pos.output]
    block, what = build_layer(analysis, pos)
    gm.add_submodule(name, block)
    traced = fx.symbolic_trace(block)
    env: dict[fx.Node, fx.Node] = {}
    made: list[fx.Node] = []
    anchor, result = x, None
    value = info(x)
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
            continue
        if node.op == "output":
            result = env[node.args[0]]
            continue
        with gm.graph.inserting_after(anchor):
            new = gm.graph.node_copy(node, lambda a: env[a])
        if node.op in ("call_module", "get_attr"):
            new.target = f"{name}.{node.target}"
        new.meta = {META: value, "nn_module_stack": _stack(node, name, ResidualLayer, "", as_text)}
        env[node] = anchor = new
        made.append(new)
    inside = set(made)
    x.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    return NewBlock(name=name, how="new", after=pos.name, layer=what,
                    zeroed=(f"{name}.out.weight", f"{name}.out.bias"),
                    params=sum(p.numel() for p in block.parameters()), shape=pos.shape,
                    input=x.name, output=result.name)
