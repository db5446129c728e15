"""Layer-level folding for inference: the first half of ``fold``.

Graphs loaded from ``.pt2`` call ``aten`` convolutions and linears on
``get_attr`` weights; ``lift_weighted_ops`` turns them back into modules so
their weights can be edited. ``fold_batchnorms`` folds BatchNorm's eval
statistics into the conv/linear before it; ``drop_identities`` removes
Dropout and Identity (no-ops in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .rescale import CONVS, call_counts, editable_layer, in_table, set_param
from .trace import META, free_name

aten = torch.ops.aten


_LIFT = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
         aten.linear.default: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.linear: 0}


def lift_weighted_ops(gm: fx.GraphModule) -> None:
    """aten/functional conv and linear calls on get_attr weights -> Conv/Linear modules."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not in_table(node.target, _LIFT) or node.kwargs:
            continue
        dims = _LIFT[node.target]
        args = list(node.args) + [None] * (7 - len(node.args))
        x, w, b = args[:3]
        if not isinstance(w, fx.Node) or w.op != "get_attr" or (
                b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr")):
            continue
        weight = attr(gm, w.target)
        bias = attr(gm, b.target) if b is not None else None
        if dims == 0:
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1,
                                                 args[6] or 1)
            if isinstance(padding, str):
                continue
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
            module = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=bias is not None)
        module.weight = _as_param(weight)
        if bias is not None:
            module.bias = _as_param(bias)
        path = _module_path(gm, str(w.target))
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta = dict(node.meta)
        replace_node(gm, node, new)


def attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


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


def fold_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Fold each BatchNorm called once after a conv/linear into it; return their names."""
    modules, calls = dict(gm.named_modules()), call_counts(gm)
    folded = []
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        if calls.get(node.target) != 1 or len(node.args) != 1:
            continue
        src = node.args[0]
        layer = editable_layer(src, modules, calls, (*CONVS, nn.Linear)) \
            if isinstance(src, fx.Node) else None
        if layer is None or len(src.users) != 1:
            continue
        if isinstance(layer, nn.Linear) and _rank(src) != 2:
            continue  # BatchNorm1d on [N, C, L] normalises dim 1, Linear writes the last dim
        out_features = layer.weight.shape[0]
        if bn.num_features != out_features:
            continue
        w, b = layer.weight.double(), layer.bias
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        scale = gamma / std
        bias = b.double() if b is not None else torch.zeros_like(std)
        set_param(layer, "weight", w * scale.view(-1, *[1] * (w.dim() - 1)), layer.weight)
        set_param(layer, "bias", (bias - bn.running_mean.double()) * scale + beta, layer.weight)
        replace_node(gm, node, src)
        folded.append(str(node.target))
    return folded


def drop_identities(gm: fx.GraphModule) -> None:
    """Remove Identity and Dropout calls (what eval mode does anyway)."""
    modules = dict(gm.named_modules())
    drop = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), drop) \
                and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            replace_node(gm, node, node.args[0])


def _rank(node: fx.Node) -> int | None:
    shape = node.meta.get(META, {}).get("shape")
    if shape is None and hasattr(node.meta.get("val"), "shape"):
        shape = node.meta["val"].shape
    return None if shape is None else len(shape)


def replace_node(gm: fx.GraphModule, node: fx.Node, by: fx.Node) -> None:
    node.replace_all_uses_with(by)
    gm.graph.erase_node(node)
