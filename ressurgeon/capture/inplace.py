"""In-place ops on activations, turned out-of-place so no shortcut reads an overwritten tensor."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
from torch import fx

from .._fx import input_dependent, node_order

aten = torch.ops.aten


def remove_inplace(gm: fx.GraphModule) -> int:
    """Turn in-place ops on activations into their out-of-place forms; return how many.

    Later readers of a tensor that an in-place op overwrote are rewired to the
    op's result, so the function stays exactly the same while no tensor is
    overwritten behind a shortcut's back. Module flags (``ReLU(inplace=True)``),
    call arguments (``F.relu(x, inplace=True)``), ``x.relu_()`` methods and
    ``torch.relu_`` / aten ``relu_`` functions are all covered. In-place updates
    of buffers (counters, running statistics) are state, not activations, and
    are left alone.
    """
    graph = gm.graph
    modules = dict(gm.named_modules())
    order = node_order(graph)
    from_input = input_dependent(graph)
    # Decided per call site, before any flag flips: a ReLU(inplace=True) module
    # called at several sites overwrites its input at every one of them.
    inplace_modules = {name for name, m in modules.items() if getattr(m, "inplace", False) is True}
    changed = 0
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] not in from_input:
            continue
        mutated = _make_out_of_place(node, modules, inplace_modules)
        if mutated is None:
            continue
        changed += 1
        for user in list(mutated.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(mutated, node)
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _make_out_of_place(node: fx.Node, modules: dict[str, nn.Module],
                       inplace_modules: set[str]) -> fx.Node | None:
    """Edit one node to its out-of-place form; return the tensor it used to overwrite."""
    if node.op == "call_module":
        if node.target in inplace_modules:
            modules[node.target].inplace = False
            return node.args[0]
        return None
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            node.target = name[:-1]
            return node.args[0]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            return node.args[0]
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if not target._schema.is_mutable:
            return None
        base = target.overloadpacket.__name__
        if not base.endswith("_"):
            return None
        packet = getattr(aten, base[:-1], None)
        if packet is None or target._overloadname not in packet.overloads():
            return None
        node.target = getattr(packet, target._overloadname)
        return node.args[0]
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and target is getattr(torch, name, None):
        outplace = getattr(torch, name[:-1], None)
        if outplace is not None:
            node.target = outplace
            return node.args[0]
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return node.args[0]
    try:
        i = _inplace_position(target)
    except TypeError:  # an unhashable callable: asked directly
        i = _inplace_position.__wrapped__(target)
    if i is not None and i < len(node.args) and node.args[i] is True:
        node.args = node.args[:i] + (False,) + node.args[i + 1:]
        return node.args[0]
    return None


@functools.lru_cache(maxsize=4096)
def _inplace_position(target) -> int | None:
    """Where ``target`` takes ``inplace`` positionally (None: it does not). Asked once per
    function: ``inspect.signature`` costs more than the rest of the pass per node."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None
