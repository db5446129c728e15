"""fold, step 2: layer-level folding for inference.

``fold_batchnorms`` folds BatchNorm's eval statistics into the conv/linear
before it; ``drop_identities`` removes the ops that are identities in eval
mode (Dropout, Identity: ``Trait.EVAL_NOOP`` in the registry).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .._fx import call_counts, editable_layer, replace_node, set_param, shape_or_val
from ..registry import Trait, has_trait

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight rows = output channels
_BatchNorm = nn.modules.batchnorm._BatchNorm


def fold_batchnorms(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[str]:
    """Fold each BatchNorm called once after a conv/linear into it; return their names."""
    calls = call_counts(gm)
    folded = []
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        # only BatchNorm itself: a subclass with its own forward (timm's BatchNormAct2d
        # applies an activation too) computes more than the affine map folded here
        if not isinstance(bn, _BatchNorm) or type(bn).forward is not _BatchNorm.forward \
                or bn.running_mean is None:
            continue
        if calls.get(node.target) != 1 or len(node.args) != 1:
            continue
        src = node.args[0]
        layer = editable_layer(src, modules, calls, _FOLDABLE) if isinstance(src, fx.Node) \
            else None
        if layer is None or len(src.users) != 1:
            continue
        if isinstance(layer, nn.Linear) and _rank(src) != 2:
            continue  # BatchNorm1d on [N, C, L] normalises dim 1, Linear writes the last dim
        if bn.num_features != layer.weight.shape[0]:
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


def drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Remove module calls that are identities in eval mode (Dropout, Identity)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and has_trait(node, modules, Trait.EVAL_NOOP) \
                and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            replace_node(gm, node, node.args[0])


def _rank(node: fx.Node) -> int | None:
    shape = shape_or_val(node)
    return None if shape is None else len(shape)
