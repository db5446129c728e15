"""What every op is, in one table: its role in a layer and the traits the passes rely on.

The table maps an op (an ``nn.Module`` class for ``call_module`` nodes, a
function or aten overload for ``call_function`` nodes, a method name for
``call_method`` nodes) to an ``OpInfo``:

- ``role``: LAYER (a weighted op: starts a layer), NORM (joins the layer it
  follows), ACTIVATION (ends it), or None (no part in layers);
- ``channel_axis``: where a layer keeps channels in its output (1 for
  convolutions, -1 for Linear and attention);
- ``traits``: facts other stages use, e.g. fold's gate absorption needs
  ``POSITIVE_HOMOGENEOUS`` (``f(s*x) = s*f(x)`` for s > 0) to carry a scale
  through an activation.

Everything the passes know about an op comes from ``op_info``; users extend all
of it at once with ``register_op``.

Example:
    >>> from ressurgeon.registry import register_op, OpInfo, Role, Trait
    >>> import torch.nn as nn
    >>> register_op(nn.Bilinear, OpInfo(Role.LAYER, channel_axis=-1))
    >>> register_op(MyReLU, OpInfo(Role.ACTIVATION, traits={Trait.POSITIVE_HOMOGENEOUS}))  # doctest: +SKIP
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
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


class Trait(Enum):
    ADD = "add"                                  # elementwise sum of two tensors
    MUL = "mul"                                  # elementwise product
    CAT = "cat"                                  # concatenation of a list of tensors
    POSITIVE_HOMOGENEOUS = "positive-homogeneous"  # f(s*x) = s*f(x) for s > 0 (ReLU, max-pool)
    LINEAR_IN_INPUT = "linear-in-input"          # f(s*x) = s*f(x) for any s (reshape, avg-pool)
    METADATA_ONLY = "metadata-only"              # reads only sizes/dtype (x.size(), x.dim())
    EVAL_NOOP = "eval-noop"                      # identity in eval mode (Dropout, Identity)
    MODE_DEPENDENT = "mode-dependent"            # an aten op whose behaviour follows train/eval
    SCALABLE = "scalable"                        # y = W*x + b: input/output scales fold into W, b
    FUSED_AFTER_ADD = "fused-after-add"          # ONNX Runtime fuses Conv + Add + this op
    LIFTABLE = "liftable"                        # functional conv/linear: can become a module
    STATES = "states"                            # gathers recurrent layers' final states: no merge
    STATE_INPUT = "state-input"                  # args after the first are a state (h0), no data path
    REARRANGES = "rearranges"                    # its output holds its input's values, moved (view)


@dataclass(frozen=True)
class OpInfo:
    """What an op is. ``spatial_dims`` (0 for linear) is set for weighted conv/linear ops."""

    role: Role | None = None
    # Axis that holds channels / features in a layer's output: 1 for NCHW-style
    # convolutions, -1 for Linear, attention and channels-last layers.
    channel_axis: int | None = None
    traits: frozenset[Trait] = field(default_factory=frozenset)
    spatial_dims: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "traits", frozenset(self.traits))

    def has(self, trait: Trait) -> bool:
        return trait in self.traits


def _layer(axis: int, dims: int | None = None, *traits: Trait) -> OpInfo:
    return OpInfo(Role.LAYER, channel_axis=axis, traits=frozenset(traits), spatial_dims=dims)


def _op(*traits: Trait, role: Role | None = None) -> OpInfo:
    return OpInfo(role, traits=frozenset(traits))


T = Trait
_NORM = _op(role=Role.NORM)
_ACT = _op(role=Role.ACTIVATION)
_RELU = _op(T.POSITIVE_HOMOGENEOUS, T.FUSED_AFTER_ADD, role=Role.ACTIVATION)
_FUSED_ACT = _op(T.FUSED_AFTER_ADD, role=Role.ACTIVATION)
_LINEAR = _op(T.LINEAR_IN_INPUT)
_POSITIVE = _op(T.POSITIVE_HOMOGENEOUS)
_EVAL_NOOP = _op(T.EVAL_NOOP, T.LINEAR_IN_INPUT)


def _entries() -> dict[object, OpInfo]:
    ops: dict[object, OpInfo] = {}

    def put(info: OpInfo, *keys) -> None:
        for key in keys:
            ops[key] = info

    # weighted ops: modules (their weights are editable), functions and aten forms
    put(_layer(1, 1, T.SCALABLE), nn.Conv1d)
    put(_layer(1, 2, T.SCALABLE), nn.Conv2d)
    put(_layer(1, 3, T.SCALABLE), nn.Conv3d)
    put(_layer(1, None, T.SCALABLE), nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    put(_layer(-1, 0, T.SCALABLE), nn.Linear)
    put(_layer(-1), nn.MultiheadAttention)
    # recurrent layers (torch.fx keeps them whole; torch.export records the aten op on a
    # flat weight list): features on the last dim, batch_first either way; the sequence
    # output (getitem 0 of the tuple) is the layer's output, h0/c0 are no data path
    put(_layer(-1, None, T.STATE_INPUT), nn.LSTM, nn.GRU, nn.RNN, aten.lstm.input,
        aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)
    put(_layer(1, 1, T.LIFTABLE), F.conv1d, aten.conv1d.default)
    put(_layer(1, 2, T.LIFTABLE), F.conv2d, aten.conv2d.default)
    put(_layer(1, 3, T.LIFTABLE), F.conv3d, aten.conv3d.default)
    put(_layer(-1, 0, T.LIFTABLE), F.linear, aten.linear.default)
    put(_layer(1), aten.convolution.default, F.conv_transpose1d, F.conv_transpose2d,
        F.conv_transpose3d, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
        aten.conv_transpose3d.input)
    # normalisation
    put(_NORM, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm,
        nn.LocalResponseNorm,  # AlexNet, GoogLeNet v1
        F.batch_norm, F.layer_norm, F.group_norm, F.rms_norm, F.instance_norm,
        F.local_response_norm, aten.layer_norm.default, aten.group_norm.default)
    put(_op(T.MODE_DEPENDENT, role=Role.NORM), aten.batch_norm.default,
        aten._native_batch_norm_legit_no_training.default)
    # activations: ReLU-likes carry a positive scale; ONNX Runtime fuses some after Conv+Add
    put(_RELU, nn.ReLU, nn.LeakyReLU, F.relu, torch.relu, F.leaky_relu, "relu",
        aten.relu.default, aten.leaky_relu.default)
    put(_op(T.POSITIVE_HOMOGENEOUS, role=Role.ACTIVATION), nn.PReLU)
    put(_FUSED_ACT, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, torch.sigmoid,
        torch.tanh, F.sigmoid, F.tanh, F.hardtanh, F.relu6, F.hardsigmoid, "tanh", "sigmoid",
        aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default, aten.hardsigmoid.default)
    put(_ACT, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Mish, nn.SELU, nn.Softplus, nn.CELU,
        F.gelu, F.silu, F.elu, F.hardswish, F.mish, F.selu, aten.gelu.default,
        aten.silu.default, aten.hardswish.default, aten.elu.default, aten.mish.default)
    # ops that carry a scale: max-pooling any positive one, linear reshapes any one
    put(_POSITIVE, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
        aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
    # rearrangements: every value of the input, moved (max |y| = max |x|, shape propagation
    # takes it from the input instead of another pass over the tensor)
    put(_op(T.LINEAR_IN_INPUT, T.REARRANGES), nn.Flatten, nn.Unflatten, torch.flatten,
        torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
        "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
        "unsqueeze", aten.view.default, aten.reshape.default, aten.flatten.using_ints,
        aten.permute.default, aten.transpose.int, aten.squeeze.dim, aten.unsqueeze.default,
        aten.clone.default)
    put(_LINEAR, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        torch.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        operator.getitem, "mean", aten.mean.dim, aten.avg_pool2d.default,
        aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
        aten._adaptive_avg_pool2d.default)
    put(_EVAL_NOOP, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
        nn.AlphaDropout)
    put(_op(T.EVAL_NOOP, T.LINEAR_IN_INPUT, T.MODE_DEPENDENT), aten.dropout.default,
        aten.feature_dropout.default)
    # joins
    put(_op(T.ADD), operator.add, operator.iadd, torch.add, aten.add.Tensor, "add", "add_",
        "__add__", "__radd__")
    put(_op(T.MUL), operator.mul, torch.mul, aten.mul.Tensor, "mul", "__mul__", "__rmul__")
    put(_op(T.CAT), torch.cat, torch.concat, torch.concatenate, aten.cat.default, "cat")
    put(_op(T.METADATA_ONLY), "size", "dim", getattr, aten.sym_size.int)
    return ops


OPS: dict[object, OpInfo] = _entries()


def register_op(key: object, info: OpInfo) -> None:
    """Add or replace what an op is (module class, function, aten overload or method name).

    Everything the passes know about an op comes from this table: its role in
    layers, its channel axis, and the traits fold relies on.

    Raises:
        TypeError: ``info`` is not an OpInfo.
    """
    if not isinstance(info, OpInfo):
        raise TypeError(f"register_op needs an OpInfo, got {type(info).__name__}")
    OPS[key] = info


def lookup(key: object) -> OpInfo | None:
    """The table entry for a module class (or a parent class), function or method name.

    A subclass found through a parent keeps the parent's role and channel axis
    (timm's BatchNormAct2d is still a norm), but not its traits when it
    overrides ``forward``: what it computes is then its own (BatchNormAct2d
    also applies an activation, so it is no plain BatchNorm to fold).
    """
    if isinstance(key, type):
        for cls in key.__mro__:
            if cls in OPS:
                info = OPS[cls]
                if cls is not key and getattr(key, "forward", None) is not getattr(cls, "forward", None):
                    return OpInfo(info.role, info.channel_axis, frozenset(), info.spatial_dims)
                return info
        return None
    try:
        return OPS.get(key)
    except TypeError:  # an unhashable fx target
        return None


def op_info(node: fx.Node, modules: dict[str, nn.Module]) -> OpInfo | None:
    """The table entry for a node, or None when the table knows nothing of its op."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return lookup(type(module)) if module is not None else None
    if node.op in ("call_function", "call_method"):
        return lookup(node.target)
    return None


def role_of(node: fx.Node, modules: dict[str, nn.Module]) -> Role | None:
    info = op_info(node, modules)
    return info.role if info else None


def has_trait(node: fx.Node, modules: dict[str, nn.Module], trait: Trait) -> bool:
    info = op_info(node, modules)
    return info is not None and trait in info.traits


def is_getitem(node: fx.Node, index: int | None = None) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem
            and (index is None or node.args[1] == index))


def scalable_modules() -> tuple[type, ...]:
    """Module classes whose weights absorb a scale of their input or output (Trait.SCALABLE)."""
    return tuple(k for k, v in OPS.items() if isinstance(k, type) and T.SCALABLE in v.traits)
