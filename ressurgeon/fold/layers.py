"""fold, step 2: layer-level folding for inference.

``fold_batchnorms`` folds BatchNorm's eval statistics into the conv/linear
before it, whether a BatchNorm module calls it or a functional ``F.batch_norm`` on the
module's own tensors (what fx makes of a BatchNorm subclass with its own forward, such as
timm's ``BatchNormAct2d``: its ``F.batch_norm`` folds, its ``drop`` and ``act`` stay); ``drop_identities`` removes the ops that are identities in eval
mode (Dropout, Identity: ``Trait.EVAL_NOOP`` in the registry).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._fx import attr, call_counts, editable_layer, replace_node, set_param, shape_or_val
from ..registry import Trait, has_trait

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight rows = output channels
_BatchNorm = nn.modules.batchnorm._BatchNorm


def fold_batchnorms(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[str]:
    """Fold each BatchNorm called once after a conv/linear into it; return their names."""
    calls = call_counts(gm)
    folded = []
    for node in list(gm.graph.nodes):
        functional = _functional_batchnorm(gm, node)
        if functional is not None:
            owner, stats = functional
            if _fold_into_layer(gm, node, modules, calls, stats):
                folded.append(owner)
            continue
        bn = modules.get(node.target) if node.op == "call_module" else None
        # only BatchNorm itself: a subclass with its own forward (timm's BatchNormAct2d
        # applies an activation too) computes more than the affine map folded here
        if not isinstance(bn, _BatchNorm) or type(bn).forward is not _BatchNorm.forward \
                or bn.running_mean is None:
            continue
        if calls.get(node.target) != 1 or len(node.args) != 1:
            continue
        stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if _fold_into_layer(gm, node, modules, calls, stats):
            folded.append(str(node.target))
    return folded


def _functional_batchnorm(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple] | None:
    """(owner path, statistics) of an eval ``F.batch_norm`` reading one module's own tensors.

    Each tensor must be a ``get_attr`` read by this call alone (a shared one would change
    other readers when folded).
    """
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    if bound.get("training", False) is not False:
        return None
    tensors = []
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = bound.get(name)
        if arg is None and name in ("weight", "bias"):
            tensors.append(None)
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr" or len(arg.users) != 1:
            return None
        tensors.append(attr(gm, arg.target))
    owner = str(bound["running_mean"].target).rpartition(".")[0]
    return owner, (*tensors, float(bound.get("eps", 1e-5)))


def _fold_into_layer(gm: fx.GraphModule, node: fx.Node, modules: dict, calls: dict,
                     stats: tuple) -> bool:
    """Fold ``(mean, var, weight, bias, eps)`` into the conv/linear ``node`` reads; True if done."""
    mean, var, weight, beta_, eps = stats
    src = node.args[0]
    layer = editable_layer(src, modules, calls, _FOLDABLE) if isinstance(src, fx.Node) \
        else None
    if layer is None or len(src.users) != 1:
        return False
    if isinstance(layer, nn.Linear) and _rank(src) != 2:
        return False  # BatchNorm1d on [N, C, L] normalises dim 1, Linear writes the last dim
    if mean.shape[0] != layer.weight.shape[0]:
        return False
    w, b = layer.weight.double(), layer.bias
    std = torch.sqrt(var.double() + eps)
    gamma = weight.double() if weight is not None else torch.ones_like(std)
    beta = beta_.double() if beta_ is not None else torch.zeros_like(std)
    scale = gamma / std
    bias = b.double() if b is not None else torch.zeros_like(std)
    set_param(layer, "weight", w * scale.view(-1, *[1] * (w.dim() - 1)), layer.weight)
    set_param(layer, "bias", (bias - mean.double()) * scale + beta, layer.weight)
    replace_node(gm, node, src)
    return True


def drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Remove module calls that are identities in eval mode (Dropout, Identity)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and has_trait(node, modules, Trait.EVAL_NOOP) \
                and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            replace_node(gm, node, node.args[0])


def _rank(node: fx.Node) -> int | None:
    shape = shape_or_val(node)
    return None if shape is None else len(shape)
