"""fold, step 2b: a residual add whose branch is exactly zero is its other operand.

A block ``deepen`` inserted computes ``x + f(x)`` with f's last layer (or its norm's scale) at
zero until fine-tuning moves it. While that layer is still exactly zero
(``analysis.zeros.is_zero``) the add computes ``x``: fold replaces the add by ``x``, and the
branch, dead now, goes with the other unused nodes. Any other add of an exactly-zero value
goes the same way: one rule, whoever made the zero.
"""

from __future__ import annotations

from torch import fx

from .._fx import info, replace_node
from ..analysis.zeros import is_zero
from ..registry import Trait, has_trait


def drop_zero_branches(gm: fx.GraphModule, modules: dict) -> list[str]:
    """Replace each ``a + b`` whose ``b`` is exactly zero by ``a``; return the zeroed ends' names.

    Only where ``a`` already has the sum's shape and dtype (a zero that broadcasts ``a`` up, or
    promotes its dtype, still changes it).
    """
    removed = []
    for node in list(gm.graph.nodes):
        if not _plain_add(node, modules):
            continue
        a, b = node.args[:2]
        for keep, zero in ((a, b), (b, a)):
            if not (isinstance(keep, fx.Node) and isinstance(zero, fx.Node)
                    and _same_value_type(keep, node)):
                continue
            end = is_zero(gm, zero, modules)
            if end is not None:
                removed.append(end.name)
                replace_node(gm, node, keep)
                break
    return removed


def _plain_add(node: fx.Node, modules: dict) -> bool:
    return (node.op in ("call_function", "call_method") and len(node.args) == 2
            and not node.kwargs and has_trait(node, modules, Trait.ADD))


def _same_value_type(keep: fx.Node, total: fx.Node) -> bool:
    """Same shape and dtype, from shape propagation or torch.export's ``val``; unknown: False."""
    a, b = info(keep), info(total)
    if a.shape is not None and b.shape is not None:
        return a.shape == b.shape and a.dtype == b.dtype
    va, vb = keep.meta.get("val"), total.meta.get("val")
    shape_a, shape_b = getattr(va, "shape", None), getattr(vb, "shape", None)
    return (shape_a is not None and shape_b is not None and tuple(shape_a) == tuple(shape_b)
            and va.dtype == vb.dtype)
