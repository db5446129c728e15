"""Fold: a rewritten model -> an inference model with the same function and fewer ops.

Like PEFT's ``merge_and_unload``, for deployment. On a copy of the model, in
this order:

1. Shortcuts inlined by torch.export (a ``.pt2``) become ``Shortcut`` modules
   again and ``aten`` convolutions and linears become modules
   (``ressurgeon.exported``).
   (``rewired.py``) Blocks ``rewire`` wrapped (DWA, hyper-connections) whose new parameters
   are still at their initial values go back to the plain residual, as their rewiring (in
   ``catalog.REWIRINGS``) says; the others stay, each with the reason.
2. (``layers.py``) BatchNorm (eval statistics) is folded into the conv/linear
   before it; Dropout and Identity modules are dropped (eval behaviour).
   (``zeros.py``) An add whose operand is exactly zero (a block ``deepen`` inserted whose
   output layer is still zero) becomes its other operand; the dead branch goes.
3. (``joins.py``) Each shortcut becomes a sum of *terms* ``c * P(v)``, read
   from ``Shortcut.terms()``; a term whose gate is exactly 0 is dropped.
4. (``merge.py``) A shortcut around one linear layer (``h = conv(x)`` after BN
   folding, e.g. ``span=1`` with pre-activation placement) is merged into that
   conv, RepVGG-style.
5. (``rescale.py``) Gates left are absorbed by rescaling where that is exact: each tensor is
   stored as ``true / s`` for a scalar s; convs/linears absorb any s in their
   weights, ReLU and max-pooling carry a positive s, linear reshapes any s.
   ``h + a*x`` becomes ``h' + x`` with ``h'`` = ``h/a`` from its conv and the
   stream stored at scale a until the next conv/linear takes it back. A gate
   whose scale would reach an op that needs the true values (the output,
   LayerNorm, a sigmoid, a negative scale into a ReLU) stays as a Mul, and the
   report says where.

Only eval-mode inference makes sense for the result (BatchNorm is gone); it
is returned in eval mode. The result is exact up to float rounding. The joins'
non-finite guard (``shortcuts.base.gated``: a zero gate contributes 0 even where
its term is inf) goes with the terms: a dropped term needs none, and a kept gate
becomes a plain Mul, which is what the guard computes for any gate but 0.
"""


from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .._fx import META, call_counts, editable_layer
from .._torch import normalize_inputs, quiet_copy
from ..config import TraceOptions
from ..errors import ConfigError, ShapeError, VerificationError
from ..load.hf import is_pretrained
from ..capture.exported import as_module, is_unlifted, lift_weighted_ops, plain_graph_module
from ..registry import Trait, has_trait
from ..capture.shapes import propagate_shapes
from ..shortcuts import is_shortcut, lift_shortcuts
from ..capture.trace import trace_model
from ..verify import compare_outputs, eval_outputs
from .joins import (FoldedSkip, Join, Outcome, close_opaque, collect_joins, drop_zero_terms,
                    emit_sums)
from .layers import drop_identities, fold_batchnorms
from .merge import merge_linear
from .rescale import absorb_gates
from .rewired import FoldedRewire, RewireOutcome, fold_rewirings, is_rewired_module
from .zeros import drop_zero_branches

__all__ = ["fold", "FoldResult", "FoldedSkip", "Outcome", "FoldedRewire", "RewireOutcome"]


@dataclass
class FoldResult:
    """The folded model and what happened to each shortcut (eval mode only)."""

    module: fx.GraphModule
    skips: list[FoldedSkip]
    batchnorms_folded: list[str]
    ops_before: int
    ops_after: int
    max_abs_diff: float | None = None   # against the unfolded model, when inputs were given
    tolerance: float | None = None
    eval_only: bool = True              # BatchNorm used its running statistics
    branches_removed: list[str] = field(default_factory=list)   # exactly-zero residual branches
    rewired: list[FoldedRewire] = field(default_factory=list)   # rewire's blocks, removed or kept

    @property
    def fusion_eligible(self) -> int:
        return sum(s.fusion is not None for s in self.skips)

    @property
    def gates_kept(self) -> dict[str, str]:
        return {s.name: s.reason or "" for s in self.skips if s.outcome is Outcome.KEPT}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skips:
            out[s.outcome.value] = out.get(s.outcome.value, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"skips": [s.to_dict() for s in self.skips], "counts": self.counts(),
                "batchnorms_folded": self.batchnorms_folded, "ops_before": self.ops_before,
                "ops_after": self.ops_after, "fusion_eligible": self.fusion_eligible,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "eval_only": self.eval_only, "branches_removed": self.branches_removed,
                "rewired": [r.to_dict() for r in self.rewired]}


def fold(module: nn.Module, example_inputs: tuple | None = None, *,
         fold_batchnorm: bool = True, trace: TraceOptions | None = None) -> FoldResult:
    """Fold shortcuts, BatchNorm, gates and still-zero new blocks into the weights for inference.

    Args:
        module: the result of ``add_skips`` (``result.module``), a GraphModule
            loaded from a ``.pt2`` that ``add-skips`` wrote, or any nn.Module
            (traced first; then ``example_inputs`` is needed). Not modified.
        example_inputs: tuple of tensors; when given, the folded model is
            checked against the unfolded one (eval mode) and shapes are known,
            which Linear + BatchNorm1d folding needs.
        fold_batchnorm: fold eval-mode BatchNorm into the conv/linear before it.
            Merging and most gate absorption need it.
        trace: how to capture a module that is not a GraphModule yet (TraceOptions).

    Returns:
        FoldResult: ``.module`` (a new GraphModule in eval mode), one FoldedSkip
        per shortcut, the BatchNorms folded, the residual branches removed because their
        last layer is exactly zero (``deepen``'s new blocks before training), one
        FoldedRewire per block ``rewire`` wrapped (``removed``: back to the plain residual,
        its new parameters still at their initial values; ``kept``: with the reason), op
        counts.

    Raises:
        ConfigError: a transformers model that ``rewire`` rewired (fold would turn it into a
            GraphModule and lose its class; ``unwrap`` gives the same class back).
        TraceError, ShapeError: ``module`` is not a GraphModule and cannot be traced.
        VerificationError: the folded model's outputs moved beyond
            ``verify.TOLERANCES["fold"]`` or became NaN/infinite (a ressurgeon bug).

    Example:
        >>> result = add_skips(model, (x,), SkipConfig(span=1))        # doctest: +SKIP
        >>> folded = fold(result.module, (x,))                          # doctest: +SKIP
        >>> [s.outcome for s in folded.skips]                           # doctest: +SKIP
        ['merged', 'merged', 'absorbed']
    """
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
    module = as_module(module)
    if isinstance(module, fx.GraphModule):
        gm = quiet_copy(module)
        if is_unlifted(gm):
            gm = plain_graph_module(gm)   # ep.module() refuses .eval()
    elif is_pretrained(module) and is_rewired_module(module):
        raise ConfigError(f"fold captures a model into a graph, and a rewired "
                          f"{type(module).__name__} would lose its class (generate, the cache, "
                          "save_pretrained): use ressurgeon.unwrap(model) (or "
                          "result.unwrap()), which gives the same class with its original "
                          "blocks back while the new parameters are at init")
    elif inputs is None:
        raise ShapeError(f"fold needs example inputs to trace a {type(module).__name__}; "
                         "pass example_inputs or the GraphModule from add_skips")
    else:
        gm = trace_model(module, inputs, trace)
    gm.eval()
    if inputs is not None and not _has_shapes(gm):
        propagate_shapes(gm, inputs)
    lift_shortcuts(gm)
    ops_before = _count_ops(gm)
    rewired = fold_rewirings(gm)
    lift_weighted_ops(gm)
    modules = dict(gm.named_modules())
    folded_bn = fold_batchnorms(gm, modules) if fold_batchnorm else []
    drop_identities(gm, modules)
    branches = drop_zero_branches(gm, modules)
    joins = collect_joins(gm)
    close_opaque(gm, joins, modules)
    drop_zero_terms(joins)
    merge_linear(gm, joins, modules)
    emit_sums(gm, joins)
    _absorb(gm, joins)
    _mark_fusion(gm, joins, dict(gm.named_modules()))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    result = FoldResult(module=gm, skips=[j.record for j in joins], batchnorms_folded=folded_bn,
                        ops_before=ops_before, ops_after=_count_ops(gm),
                        branches_removed=branches, rewired=rewired)
    if inputs is not None:
        _verify(module, result, inputs)
    return result


def _count_ops(gm: fx.GraphModule) -> int:
    """Ops a runtime executes; a shortcut module counts as its Add, Mul and projection."""
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and is_shortcut(m := gm.get_submodule(n.target)):
            count += 1 + (m.gate is not None) + (m.kind == "projection")
        elif n.op in ("call_module", "call_function", "call_method"):
            count += 1
    return count


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(META in n.meta or "val" in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def _drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers nothing reads any more (a .pt2's gates, BN statistics)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        parts = name.split(".")
        if any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
            continue
        owner, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, leaf)


def _absorb(gm: fx.GraphModule, joins: list[Join]) -> None:
    gates = {mul: g for join in joins for mul, g in join.gates.items()}
    if not gates:
        return
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    kept = absorb_gates(gm, gates, {j.add for j in joins if j.add is not None}, dtype)
    for join in joins:
        reasons = [kept[m] for m in join.gates if m in kept]
        if reasons:
            join.record.outcome, join.record.reason = Outcome.KEPT, reasons[0]


def _mark_fusion(gm: fx.GraphModule, joins: list[Join], modules: dict[str, nn.Module]) -> None:
    """Which Adds follow a conv with bias (ORT/TensorRT fuse them); give bias-free convs a zero bias."""
    calls = call_counts(gm)
    for join in joins:
        add = join.add
        if add is None:
            continue
        conv = None
        for arg in add.args:
            layer = editable_layer(arg, modules, calls, (nn.Conv2d,)) \
                if isinstance(arg, fx.Node) else None
            if layer is not None and len(arg.users) == 1:
                conv = layer
                break
        if conv is None:
            continue
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device),
                                     requires_grad=conv.weight.requires_grad)
        users = list(add.users)
        act = len(users) == 1 and has_trait(users[0], modules, Trait.FUSED_AFTER_ADD)
        join.record.fusion = "conv+add+act" if act else "conv+add"


def _verify(original: nn.Module, result: FoldResult, inputs: tuple) -> None:
    parity = compare_outputs(eval_outputs(original, inputs), eval_outputs(result.module, inputs),
                             check="fold")
    result.max_abs_diff, result.tolerance = parity.max_abs_diff, parity.tolerance
    if not parity.ok:
        raise VerificationError(f"the folded model's outputs differ from the unfolded model's "
                                f"({parity.describe()}); this is a ressurgeon bug, please "
                                "report it")
