"""Generic torch.fx plumbing that every stage imports: our node record, names, graph edits.

Our annotations live under one key, ``node.meta["ressurgeon"]``, as a typed
``NodeInfo`` (like torch's ``node.meta["tensor_meta"]``), and
``gm.meta["ressurgeon"]`` holds a ``CaptureInfo``. Nothing here knows about
layers, spans or shortcuts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import fx

from ._names import is_fqn

META = "ressurgeon"


@dataclass(frozen=True)
class NodeInfo:
    """What shape propagation learnt about one node's value.

    ``shape``/``dtype``/``device`` are set for single tensors; ``nodata`` marks
    values that hold no tensor at all (``x.shape``, ``x.size(0)``, an optional
    input left at None): they carry no activation, so no branch joins through
    them. ``skip`` names the shortcut whose sum this node is. ``absmax`` is the
    largest magnitude of a floating-point value on the example inputs (inf or
    nan when it is not finite; None with fake shapes).
    """

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    nodata: bool = False
    skip: str | None = None
    absmax: float | None = None      # max |value| on the example inputs (None: not measured)


_EMPTY = NodeInfo()


def info(node: fx.Node) -> NodeInfo:
    """The node's record (an empty one when shapes were never propagated)."""
    found = node.meta.get(META)
    return found if isinstance(found, NodeInfo) else _EMPTY


def set_info(node: fx.Node, **fields) -> NodeInfo:
    """Replace some fields of the node's record; returns the new record."""
    node.meta[META] = replace(info(node), **fields)
    return node.meta[META]


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded shape when the node is one tensor, else None."""
    return info(node).shape


def shape_or_val(node: fx.Node) -> tuple[int, ...] | None:
    """The node's shape from our record, else from torch.export's ``meta["val"]``."""
    shape = info(node).shape
    if shape is None and hasattr(node.meta.get("val"), "shape"):
        shape = tuple(int(d) for d in node.meta["val"].shape)
    return shape


def has_data(node: fx.Node) -> bool:
    """False for values that hold no tensor (sizes, None)."""
    return not info(node).nodata


@dataclass(frozen=True)
class CaptureInfo:
    """How a GraphModule was captured: "fx", "export" or "graph" (it was one already).

    ``dynamic``: for a torch.export capture, the (input, dim) pairs that stayed
    symbolic; every other dim of its inputs is fixed to the captured size.
    ``ranges``: (input, dim, least, most) of those dims (most None: unbounded),
    the sizes the capture allowed; a ``.pt2`` written from it keeps them.
    ``mode_baked``: the original's modules (paths) whose train-mode behaviour
    the capture fixed in the mode it ran in.
    """

    method: str
    fx_error: str | None = None
    dynamic: tuple[tuple[int, int], ...] | None = None
    ranges: tuple[tuple[int, int, int, int | None], ...] = ()
    # modules whose train-mode behaviour the capture baked in the capture's mode
    # (torch.export inlines drop-path and the like; fx keeps them as leaves)
    mode_baked: tuple[str, ...] = ()


def capture_info(gm: fx.GraphModule) -> CaptureInfo:
    found = gm.meta.get(META)
    return found if isinstance(found, CaptureInfo) else CaptureInfo(method="graph")


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each node's position: fx graphs are kept in topological order."""
    return {n: i for i, n in enumerate(graph.nodes)}


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call sites each submodule has."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes reached from a placeholder."""
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


def free_name(gm: nn.Module, path: str) -> str:
    """``path``, or ``path_1``, ``path_2``... whichever names no attribute of gm yet."""
    candidate, i = path, 1
    while _taken(gm, candidate):
        candidate, i = f"{path}_{i}", i + 1
    return candidate


def _taken(gm: nn.Module, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return False
    return hasattr(owner, leaf)


def stack_path(node: fx.Node) -> str | None:
    """The module path torch.export recorded for a node (``nn_module_stack``), if any.

    Only a dotted path of identifiers and indices (with torch's call count,
    ``relu@1``) is returned: the path becomes a submodule name, which fx
    writes into generated source, and a graph may come from a file.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        safe = isinstance(path, str) and is_fqn(re.sub(r"@[0-9]{1,9}$", "", path))
        return path if path and safe else None
    return None


def node_label(node: fx.Node) -> str:
    """A readable name: the module path for module calls and exported ops, else the node name."""
    if node.op == "call_module":
        return str(node.target)
    return stack_path(node) or node.name


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'Conv2d' for a module call, 'conv2d' for an aten op, the function's name otherwise."""
    if node.op == "call_module" and node.target in modules:
        return type(modules[node.target]).__name__
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def attr(gm: nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    owner, _, name = str(target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def replace_node(gm: fx.GraphModule, node: fx.Node, by: fx.Node) -> None:
    """Every use of ``node`` reads ``by`` instead; ``node`` is erased."""
    node.replace_all_uses_with(by)
    gm.graph.erase_node(node)


def swap_for_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple,
                    path: str, *, replace_existing: bool = False) -> fx.Node:
    """Replace ``node`` by a call of ``module`` (added at ``path``, or a free name beside it)."""
    if not replace_existing:
        path = free_name(gm, path)
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, args)
    new.meta = dict(node.meta)
    replace_node(gm, node, new)
    return new


def plain_instance(module: object, types: tuple[type, ...]) -> bool:
    """``isinstance`` that also requires the class's own ``forward`` be one of ``types``'.

    A subclass that overrides ``forward`` (timm's StdConv2d standardises its
    weight, BatchNormAct2d adds an activation) computes something else, and
    editing its weights as if it were the parent would change the model.
    """
    return isinstance(module, types) and any(type(module).forward is t.forward for t in types)


def editable_layer(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                   types: tuple[type, ...]) -> nn.Module | None:
    """The module of a weighted call whose weights we may edit (called once, one argument)."""
    if node.op != "call_module" or calls.get(node.target, 0) != 1 or len(node.args) != 1:
        return None
    module = modules.get(node.target)
    return module if plain_instance(module, types) else None


def set_param(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Give ``module.name`` a new Parameter (never edit one another module may share)."""
    setattr(module, name, nn.Parameter(value.to(like.dtype).detach().clone(),
                                       requires_grad=like.requires_grad))
