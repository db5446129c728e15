"""The join protocol: what one class must say for a residual join to work in every stage.

A join is an ``nn.Module`` subclass of ``JoinModule`` registered in
``ressurgeon.catalog.JOINS`` under ``join_name``. Its module computes the join
(``forward(h, x)``); its class answers every question a stage asks about it,
so no stage branches on a particular join:

=====================  ==========================================================
stage                  hook
=====================  ==========================================================
config                 the catalog entry: allowed inits, formulas, why not
selection + plan check ``verdict`` (may these two ends be joined), ``candidate``
                       (the span a chain pattern proposes), ``with_consumer``
                       (a span another pattern proposes, completed with the
                       layer that reads its target), ``check_planned``
rewrite                ``build`` (the module), ``insert`` (how it enters the graph)
fold                   ``terms()`` (a sum of scaled terms) or ``reduces_to()``, and
                       ``fold_back`` for joins that are neither
after torch.export     ``from_inlined`` (recognise the plain ops it became)
gates                  ``openness`` (how far the shortcut is open), ``formula``
training               ``parameter_roles`` and ``gate_lr_scale``
save_code              ``constructor_args()``: the (args, kwargs) that rebuild the
                       module (child modules included), which ``module.py`` spells
=====================  ==========================================================

The defaults are those of a two-ended join ``J(h, S(x))`` that replaces the
span's output (add and highway use them unchanged). The context objects the
hooks receive (``analysis``, ``chooser``, ``editor``) come from the stage that
calls them; a join reads them and never imports a later stage.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import fx

from .._fx import info, set_info
from ..catalog import JOINS
from ..config import Init
from ..registry import OpInfo, Trait, register_op
from ..verdicts import PairVerdict, pair_verdict
from ._graph import ShortcutSite, build_projection


def gated(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``coef * value``, where a coefficient of exactly 0 contributes exactly 0, inf/NaN included.

    IEEE gives ``0 * inf = NaN``: a closed gate would turn an infinite shortcut
    value into a NaN output although the original output was finite. Here the
    non-finite entries of ``value`` are replaced by 0 only where ``coef`` is 0,
    so the product is IEEE's ``coef * value`` for every other coefficient (fold
    can emit a plain Mul), and d/d(coef) is the sum over the finite entries:
    a closed gate still gets its gradient on the first step (a ``where`` on
    ``coef == 0`` around the product would cut it). Cost: an ``isfinite``, an
    ``or`` and a ``where`` on ``value`` (README, "What the guard costs").

    Example:
        >>> gate = torch.zeros((), requires_grad=True)
        >>> value = torch.tensor([2.0, float("inf")])
        >>> out = gated(gate, value)
        >>> out.tolist(), torch.autograd.grad(out.sum(), gate)[0].item()
        ([0.0, 0.0], 2.0)
    """
    keep = torch.isfinite(value) | (coef != 0)
    return coef * torch.where(keep, value, 0)


def finite_or_zero(value: torch.Tensor) -> torch.Tensor:
    """``value`` with inf/NaN entries replaced by 0: what a layer whose weights start at zero reads.

    A zero weight times inf is NaN; a layer that is exactly 0 at insertion (concat's new
    columns, deepen's zeroed output layer) reads its input through this, so it outputs exactly
    0 for every input. Its gradient is ``value``'s on the finite entries.
    """
    return torch.where(torch.isfinite(value), value, 0)


def strided(proj: nn.Module | None) -> bool:
    """True for a strided ConvNd projection: its output size is ceil(H / s) for every H."""
    return isinstance(proj, nn.modules.conv._ConvNd) and any(s > 1 for s in proj.stride)


def fit_spatial(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` cropped to ``like``'s spatial size (dims 2 and up): what a strided shortcut joins.

    A 1x1 stride-s projection gives ceil(H/s) positions; the span it bypasses may give
    floor(H/s) (``MaxPool2d(2)``, ``MaxPool2d(3, 2, ceil_mode=True)``) at odd sizes. Its
    position i reads the span input's position s*i, as the span's does, so the extra last
    position is cropped. A span that gives *more* positions than the projection cannot be
    served: ShapeError, naming both sizes.
    """
    if not torch.compiler.is_compiling():
        short = [d for d in range(2, value.dim()) if value.shape[d] < like.shape[d]]
        if short:
            from ..errors import ShapeError
            raise ShapeError(
                f"the strided shortcut gives spatial size {tuple(value.shape[2:])} where the "
                f"span gives {tuple(like.shape[2:])}: this input size is one the projection "
                "(1x1, stride s: ceil(H/s)) cannot serve; use an input size where the span "
                "gives at most ceil(H/s), or exclude this span")
    for d in range(2, value.dim()):
        value = value.narrow(d, 0, like.shape[d])
    return value


# a crop carries any scale (fold's rescaling passes it like a reshape); it reads ``like``'s size only
register_op(fit_spatial, OpInfo(traits={Trait.LINEAR_IN_INPUT}))


class JoinModule(nn.Module):
    """Base class of every join module (see the module docstring for the protocol)."""

    join_name: ClassVar[str] = ""
    #: the kinds a planned skip of this join may have ("identity"/"projection", or "concat")
    planned_kinds: ClassVar[tuple[str, ...]] = ("identity", "projection")
    #: why fold keeps an open join that is neither a sum nor reducible
    kept_reason: ClassVar[str] = "the join depends on its input: no exact fold"
    #: gate learning rate as a multiple of the weights', per init (training.param_groups)
    gate_lr_scales: ClassVar[dict[str, float]] = {}

    init: Init | None
    gate: nn.Parameter | None

    @property
    def join(self) -> str:
        """The name this join is registered under (what ``--join`` takes)."""
        return self.join_name

    @property
    def kind(self) -> str:
        return "identity" if isinstance(getattr(self, "proj", None), (nn.Identity, type(None))) \
            else "projection"

    @property
    def formula(self) -> str:
        entry = JOINS.get(self.join_name)
        if entry is None or self.init is None:
            return ""
        return entry.formulas.get(self.init.value, "")

    # -- fold -----------------------------------------------------------------------------

    def terms(self):
        """The addends of a join that is a sum of scaled terms (``Term``s); None otherwise."""
        return None

    def reduces_to(self) -> str | None:
        """For a join that is no sum: what it computes while closed ("h", "x"), else None."""
        return None

    def fold_back(self, gm: fx.GraphModule, site: ShortcutSite, modules: dict) -> str | None:
        """Undo a join that is neither a sum nor reducible (e.g. concat's widened layer).

        Returns None when the join has no such rule (fold then uses ``terms`` or
        ``reduces_to``), "removed" when it took itself out of ``gm``, or a reason
        why it has to stay.
        """
        return None

    # -- reports and training ---------------------------------------------------------------

    def openness(self, site: ShortcutSite | None, modules: dict) -> float | None:
        """How far the shortcut is open: its gate (the largest |g| for per-channel gates)."""
        gate = getattr(self, "gate", None)
        if gate is None:
            return None
        gate = gate.detach().float()
        return float(gate.item()) if gate.numel() == 1 else float(gate.abs().max())

    def parameter_roles(self) -> dict[str, str]:
        """{parameter name: "gate" | "added"} for ``ressurgeon.training.param_groups``."""
        return {name: "gate" if name == "gate" else "added"
                for name, _ in self.named_parameters()}

    def gate_lr_scale(self) -> float:
        return self.gate_lr_scales.get(self.init.value if self.init else "", 1.0)

    # -- selection, plan check, rewrite (classmethods: there is no module yet) -------------

    @classmethod
    def verdict(cls, analysis, src: fx.Node, dst: fx.Node, src_axis: int,
                dst_axis: int) -> PairVerdict:
        """May a shortcut of this join read ``src`` and join it at ``dst``? (selection and plans)"""
        return pair_verdict(analysis, src, dst, src_axis, dst_axis)

    @classmethod
    def candidate(cls, chooser):
        """The span the chain pattern proposes for one unit (``chooser`` is select's context)."""
        return chooser.best_source(cls)

    @classmethod
    def with_consumer(cls, analysis, span, consumer):
        """Complete a span a pattern proposed with ``consumer``, the layer reading its target.

        A pattern other than the chain (mirror) finds the tensor to join at,
        ``span.target``, and the one weighted layer that reads it (a ``Layer``,
        None when several or none do) and leaves the rest to the join: a
        two-ended join replaces the target for every reader and needs no
        consumer, so the span is returned as it is.
        """
        return span

    @classmethod
    def check_planned(cls, analysis, skip, src: fx.Node, dst: fx.Node, src_axis: int,
                      where: str) -> tuple[PairVerdict, str | None]:
        """The verdict on a planned skip, and the layer it widens (None for two-ended joins)."""
        return cls.verdict(analysis, src, dst, src_axis, skip.channel_axis), None

    @classmethod
    def build(cls, init: Init, planned, src_info, dst_info) -> nn.Module:
        """The module for one planned skip (override for joins with more parts)."""
        return cls(init, cls.projection(planned, src_info, dst_info))

    @staticmethod
    def projection(planned, src_info, dst_info) -> nn.Module | None:
        if planned.kind != "projection":
            return None
        return build_projection(src_info.shape, dst_info.shape, planned.channel_axis,
                                planned.stride)

    @classmethod
    def insert(cls, gm: fx.GraphModule, name: str, planned, init: Init, src: fx.Node,
               dst: fx.Node, consumer: fx.Node | None) -> tuple[fx.Node, fx.Node, int]:
        """Put the join into ``gm``: ``name(dst, src)`` replaces ``dst`` for every later reader.

        Returns:
            (the node replaced, the node replacing it, parameters added).
        """
        src_info, dst_info = info(src), info(dst)
        module = cls.build(init, planned, src_info, dst_info).to(device=src_info.device,
                                                                 dtype=src_info.dtype)
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(dst):
            total = gm.graph.call_module(name, (dst, src))
        total.meta = {}
        set_info(total, **{**dst_info.__dict__, "skip": name})
        dst.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        return dst, total, sum(p.numel() for p in module.parameters())

    @classmethod
    def from_inlined(cls, gm: fx.GraphModule, path: str,
                     nodes: list[fx.Node]) -> ShortcutSite | None:
        """Recognise this join in the plain ops torch.export made of it (None: not this join)."""
        return None
