"""Per-op behaviour in one table: which ops make a layer, and how projections are built.

A *layer* is a weighted op (the anchor) followed by its normalisation and its
activation. The table maps an op (an ``nn.Module`` class for ``call_module``
nodes, a function for ``call_function`` nodes, a method name for
``call_method`` nodes) to its role. Users extend it with ``register_op``.

Example:
    >>> from ressurgeon.registry import register_op, Role, OpInfo
    >>> import torch.nn as nn
    >>> register_op(nn.Bilinear, OpInfo(Role.LAYER, channel_axis=-1))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten


class Role(Enum):
    LAYER = "layer"            # weighted op: starts a layer
    NORM = "norm"              # joins the layer it follows
    ACTIVATION = "activation"  # ends the layer it follows


@dataclass(frozen=True)
class OpInfo:
    role: Role
    # Axis that holds channels / features in this op's output: 1 for NCHW-style
    # convolutions, -1 for Linear, attention and channels-last layers.
    channel_axis: int | None = None


_CHANNELS_FIRST = OpInfo(Role.LAYER, channel_axis=1)
_FEATURES_LAST = OpInfo(Role.LAYER, channel_axis=-1)
_NORM = OpInfo(Role.NORM)
_ACT = OpInfo(Role.ACTIVATION)

OPS: dict[object, OpInfo] = {
    # weighted ops, modules
    nn.Conv1d: _CHANNELS_FIRST, nn.Conv2d: _CHANNELS_FIRST, nn.Conv3d: _CHANNELS_FIRST,
    nn.ConvTranspose1d: _CHANNELS_FIRST, nn.ConvTranspose2d: _CHANNELS_FIRST,
    nn.ConvTranspose3d: _CHANNELS_FIRST,
    nn.Linear: _FEATURES_LAST, nn.MultiheadAttention: _FEATURES_LAST,
    # weighted ops, functions (functional models, torch.export graphs)
    F.conv1d: _CHANNELS_FIRST, F.conv2d: _CHANNELS_FIRST, F.conv3d: _CHANNELS_FIRST,
    F.linear: _FEATURES_LAST, F.conv_transpose1d: _CHANNELS_FIRST,
    F.conv_transpose2d: _CHANNELS_FIRST, F.conv_transpose3d: _CHANNELS_FIRST,
    aten.conv1d.default: _CHANNELS_FIRST, aten.conv2d.default: _CHANNELS_FIRST,
    aten.conv3d.default: _CHANNELS_FIRST, aten.convolution.default: _CHANNELS_FIRST,
    aten.conv_transpose1d.default: _CHANNELS_FIRST, aten.conv_transpose2d.input: _CHANNELS_FIRST,
    aten.conv_transpose3d.input: _CHANNELS_FIRST,
    aten.linear.default: _FEATURES_LAST,
    # normalisation
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM, nn.BatchNorm3d: _NORM,
    nn.LayerNorm: _NORM, nn.GroupNorm: _NORM, nn.InstanceNorm1d: _NORM,
    nn.InstanceNorm2d: _NORM, nn.InstanceNorm3d: _NORM, nn.RMSNorm: _NORM,
    nn.LocalResponseNorm: _NORM,  # AlexNet, GoogLeNet v1
    F.batch_norm: _NORM, F.layer_norm: _NORM, F.group_norm: _NORM, F.rms_norm: _NORM,
    F.instance_norm: _NORM, F.local_response_norm: _NORM,
    aten.batch_norm.default: _NORM, aten.layer_norm.default: _NORM,
    aten.group_norm.default: _NORM,
    # activations
    nn.ReLU: _ACT, nn.ReLU6: _ACT, nn.LeakyReLU: _ACT, nn.GELU: _ACT, nn.SiLU: _ACT,
    nn.ELU: _ACT, nn.Tanh: _ACT, nn.Sigmoid: _ACT, nn.Hardswish: _ACT,
    nn.Hardtanh: _ACT, nn.Mish: _ACT, nn.PReLU: _ACT, nn.SELU: _ACT, nn.Softplus: _ACT,
    nn.Hardsigmoid: _ACT, nn.CELU: _ACT,
    F.relu: _ACT, F.relu6: _ACT, F.leaky_relu: _ACT, F.gelu: _ACT, F.silu: _ACT,
    F.elu: _ACT, F.hardswish: _ACT, F.hardtanh: _ACT, F.mish: _ACT, F.selu: _ACT,
    torch.relu: _ACT, torch.tanh: _ACT, torch.sigmoid: _ACT, F.tanh: _ACT, F.sigmoid: _ACT,
    "relu": _ACT, "tanh": _ACT, "sigmoid": _ACT,
    aten.relu.default: _ACT, aten.gelu.default: _ACT, aten.silu.default: _ACT,
    aten.tanh.default: _ACT, aten.sigmoid.default: _ACT, aten.hardtanh.default: _ACT,
    aten.leaky_relu.default: _ACT, aten.hardswish.default: _ACT, aten.elu.default: _ACT,
    aten.hardsigmoid.default: _ACT, aten.mish.default: _ACT,
    F.hardsigmoid: _ACT,
}


def register_op(key: object, info: OpInfo) -> None:
    """Add or replace the role of an op (module class, function or method name)."""
    if not isinstance(info, OpInfo):
        raise TypeError(f"register_op needs an OpInfo, got {type(info).__name__}")
    OPS[key] = info


def op_info(node: fx.Node, modules: dict[str, nn.Module]) -> OpInfo | None:
    """The table entry for a node, or None when the op plays no part in layers."""
    if node.op == "call_module":
        module = modules.get(node.target)
        for cls in type(module).__mro__:
            if cls in OPS:
                return OPS[cls]
        return None
    if node.op in ("call_function", "call_method"):
        try:
            return OPS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def is_getitem(node: fx.Node, index: int | None = None) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem
            and (index is None or node.args[1] == index))


def build_projection(src_shape: tuple[int, ...], dst_shape: tuple[int, ...],
                     channel_axis: int, stride: int) -> nn.Module:
    """A 1x1 projection that maps a tensor of src_shape onto dst_shape.

    Channels-first tensors of rank 3-5 get a (strided) 1x1 ConvNd, as in ResNet's
    option B; features-last tensors (and rank-2 [B, F]) get a Linear on the last dim.
    """
    rank = len(src_shape)
    if channel_axis == 1 and rank >= 3:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank]
        return conv(src_shape[1], dst_shape[1], kernel_size=1, stride=stride, bias=False)
    if stride != 1:
        raise ValueError("a features-last projection cannot change spatial size")
    return nn.Linear(src_shape[-1], dst_shape[-1], bias=False)
