"""aten ops of an exported graph turned back into modules that own the graph's tensors.

BatchNorm and dropout (ops whose result depends on train/eval) become modules that
follow ``.train()``/``.eval()``; conv and linear calls on get_attr weights become
Conv/Linear modules, so fold and the gate report see layers, not ops.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
from torch import fx

from .._fx import attr, free_name, stack_path, swap_for_module
from ..registry import Role, Trait, lookup

aten = torch.ops.aten


def _modules_from_mode_ops(gm: fx.GraphModule) -> None:
    """aten batch_norm / dropout (Trait.MODE_DEPENDENT) -> modules that follow train/eval."""
    graph = gm.graph
    for node in list(graph.nodes):
        info = lookup(node.target) if node.op == "call_function" else None
        if info is None or Trait.MODE_DEPENDENT not in info.traits:
            continue
        if info.role is Role.NORM:
            _replace_batch_norm(gm, node)
        else:
            x, p = node.args[0], node.args[1]
            dims = len(x.meta["val"].shape) if "val" in x.meta else 2
            cls = nn.Dropout if node.target is aten.dropout.default else (
                {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}.get(dims, nn.Dropout))
            swap_for_module(gm, node, cls(p), (x,), stack_path(node) or "dropout")
    # BN's num_batches_tracked increment is part of the BatchNorm module now.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.add_.Tensor and not node.users:
            target = node.args[0]
            if target.op == "get_attr" and str(target.target).endswith("num_batches_tracked"):
                graph.erase_node(node)


def _replace_batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    x, weight, bias, mean, var = node.args[:5]
    if node.target is aten.batch_norm.default:
        momentum, eps = node.args[6], node.args[7]
    else:
        momentum, eps = node.args[5], node.args[6]
    tensors = {name: (gm.get_parameter(a.target) if name in ("weight", "bias")
                      else gm.get_buffer(a.target)) if isinstance(a, fx.Node) else None
               for name, a in (("weight", weight), ("bias", bias),
                               ("running_mean", mean), ("running_var", var))}
    rank = len(x.meta["val"].shape)
    channels = x.meta["val"].shape[1]
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    bn = cls(int(channels), eps=eps, momentum=momentum,
             affine=tensors["weight"] is not None,
             track_running_stats=tensors["running_mean"] is not None)
    for name, t in tensors.items():
        if t is not None:
            setattr(bn, name, t)  # the very same Parameter / buffer: no copy
    path = None
    for a in (weight, bias, mean, var):
        if isinstance(a, fx.Node) and "." in str(a.target):
            path = str(a.target).rsplit(".", 1)[0]
            break
    if path is not None and tensors["running_mean"] is not None:
        try:
            bn.num_batches_tracked = gm.get_buffer(f"{path}.num_batches_tracked")
        except AttributeError:
            pass
    user = node
    if node.target is not aten.batch_norm.default:  # returns a tuple: use its item 0
        items = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(items) != 1 or len(node.users) != 1:
            return
        user = items[0]
    swap_for_module(gm, user, bn, (x,), path or stack_path(node) or "batch_norm",
                    replace_existing=path is not None)
    if user is not node:
        gm.graph.erase_node(node)


def lift_weighted_ops(gm: fx.GraphModule) -> None:
    """Functional/aten conv and linear calls on get_attr weights (Trait.LIFTABLE) -> modules.

    fold edits weights through modules; a graph loaded from ``.pt2`` calls
    ``aten.conv2d(x, weight, bias, ...)`` on loose tensors instead.
    """
    for node in list(gm.graph.nodes):
        info = lookup(node.target) if node.op == "call_function" else None
        if info is None or Trait.LIFTABLE not in info.traits or node.kwargs:
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        x, w, b = args[:3]
        if not isinstance(w, fx.Node) or w.op != "get_attr" or (
                b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr")):
            continue
        weight = attr(gm, w.target)
        bias = attr(gm, b.target) if b is not None else None
        if info.spatial_dims == 0:
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1,
                                                 args[6] or 1)
            if isinstance(padding, str):
                continue
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[info.spatial_dims]
            module = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=bias is not None)
        module.weight = _as_param(weight)
        if bias is not None:
            module.bias = _as_param(bias)
        path = _module_path(gm, str(w.target))
        swap_for_module(gm, node, module, (x,), path, replace_existing=True)


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _module_path(gm: fx.GraphModule, weight_target: str) -> str:
    """The weight's owner path when that owner holds nothing else (as ep.module() builds it)."""
    owner = weight_target.rpartition(".")[0]
    if owner:
        try:
            holder = gm.get_submodule(owner)
        except AttributeError:
            holder = None
        if (holder is not None and type(holder) is nn.Module and not list(holder.children())
                and not list(holder.buffers())
                and {n for n, _ in holder.named_parameters()} <= {"weight", "bias"}):
            return owner
    return free_name(gm, (owner or "linear").replace(".", "_"))

