"""Which parameters make a value exactly zero: the end of a residual branch.

Analysis only: nothing here touches weights or edits the graph.

A residual block ``x + f(x)`` is exactly the identity while f's value is exactly 0.
``branch_end`` walks back from f's value through ops that keep an exact zero (reshapes,
eval-mode no-ops, ReLU-likes and pooling, a product) to the first op whose own parameters, set
to zero, make it zero: a conv or linear (weight and bias), an affine norm (scale and shift), or
a product with a parameter (a layer scale, a norm's scale written out). ``deepen`` zeroes
those parameters in the blocks it inserts; ``fold`` drops an add whose operand they already
make zero. Both ask this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .._fx import attr, op_name
from ..registry import Role, Trait, op_info

aten = torch.ops.aten

# Ops through which an exact zero passes unchanged: f(0) = 0 (its first tensor argument).
_PASS = frozenset({Trait.LINEAR_IN_INPUT, Trait.EVAL_NOOP, Trait.POSITIVE_HOMOGENEOUS})
# Functional norms: the positions of their scale and shift arguments.
_NORM_ARGS = {F.layer_norm: (2, 3), aten.layer_norm.default: (2, 3), F.group_norm: (2, 3),
              aten.group_norm.default: (2, 3), F.rms_norm: (2,)}


@dataclass(frozen=True)
class BranchEnd:
    """Where a branch can be made exactly zero, or the op that keeps it from being.

    ``tensors`` are the qualified names (``blocks.0.fc2.weight``) of the parameters whose
    zero makes the value zero; empty when the walk stopped at ``op`` (``node``) first.
    """

    node: str
    op: str
    tensors: tuple[str, ...] = ()

    @property
    def zeroable(self) -> bool:
        return bool(self.tensors)

    @property
    def name(self) -> str:
        """The module that owns the tensors (``blocks.0.fc2``), or the tensor itself."""
        owners = {t.rpartition(".")[0] for t in self.tensors}
        return owners.pop() if len(owners) == 1 and "" not in owners else ", ".join(self.tensors)


def branch_end(node: fx.Node, modules: dict) -> BranchEnd:
    """The parameters whose zero makes ``node``'s value exactly zero (see the module docstring).

    Args:
        node: the value of a residual branch (the operand of the add that is not the skip).
        modules: ``dict(gm.named_modules())``.

    Returns:
        A BranchEnd; ``.zeroable`` is False when an op on the way does not keep a zero
        (a norm without a scale, an opaque call, a sigmoid...).
    """
    while True:
        info = op_info(node, modules)
        found = _own_parameters(node, modules, info)
        if found:
            return BranchEnd(node.name, op_name(node, modules), found)
        if info is not None and Trait.MUL in info.traits:
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            params = [a for a in operands if a.op == "get_attr"]
            if params:   # x * gamma: a zero gamma makes the product zero
                return BranchEnd(node.name, op_name(node, modules), (str(params[0].target),))
            ends = [branch_end(a, modules) for a in operands]
            return next((e for e in ends if e.zeroable),
                        ends[0] if ends else BranchEnd(node.name, op_name(node, modules)))
        if info is not None and info.traits & _PASS and info.role is not Role.LAYER:
            data = next((a for a in node.args if isinstance(a, fx.Node)), None)
            if data is not None and data.op != "get_attr":
                node = data
                continue
        return BranchEnd(node.name, op_name(node, modules))


def _own_parameters(node: fx.Node, modules: dict, info) -> tuple[str, ...]:
    """Qualified names of the parameters that scale ``node``'s whole output, if it has them."""
    if info is None:
        return ()
    if node.op == "call_module":
        module = modules[node.target]
        scaled = (info.role is Role.LAYER and Trait.SCALABLE in info.traits) or (
            info.role is Role.NORM and isinstance(getattr(module, "weight", None), torch.Tensor))
        if not scaled:
            return ()
        return tuple(f"{node.target}.{name}" for name in ("weight", "bias")
                     if isinstance(getattr(module, name, None), torch.Tensor))
    if node.op != "call_function":
        return ()
    if Trait.LIFTABLE in info.traits:   # F.linear / aten.conv2d(x, weight, bias, ...)
        positions = (1, 2)
    elif node.target in _NORM_ARGS:
        positions = _NORM_ARGS[node.target]
    else:
        return ()
    args = [node.args[i] if i < len(node.args) else None for i in positions]
    if not isinstance(args[0], fx.Node) or args[0].op != "get_attr" or any(
            a is not None and (not isinstance(a, fx.Node) or a.op != "get_attr") for a in args):
        return ()
    return tuple(str(a.target) for a in args if a is not None)


def is_zero(gm: fx.GraphModule, node: fx.Node, modules: dict) -> BranchEnd | None:
    """The BranchEnd that makes ``node`` exactly zero now (its tensors are all 0), else None."""
    end = branch_end(node, modules)
    if not end.zeroable:
        return None
    for name in end.tensors:
        value = attr(gm, name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.any():
            return None
    return end


__all__ = ["BranchEnd", "branch_end", "is_zero"]
