"""The whole pass in one call: trace -> analyse -> find spans -> plan -> rewrite -> verify.

The graph analysis is computed once per call and handed to span selection and
to the rewrite; ``inspect_model`` stops after the spans and returns everything
the ``inspect`` command shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch import fx

from .._fx import capture_info
from .._torch import gc_paused, normalize_inputs
from ..analysis.blocks import Residual
from ..analysis.layers import GraphAnalysis, Layer, analyze_graph
from ..config import Init, SkipConfig, TraceOptions
from ..errors import VerificationError
from ..capture.exported import as_module
from ..capture.submodule import splice, submodule_inputs
from ..load.record import ModelRecord, record_of
from .plan import SurgeryPlan, plan_skips
from .rewrite import Skip, apply_plan
from .select import Reason, Span, mark_planned, select_spans
from ..capture.trace import trace_model
from ..verify import ParityReport, check_parity, watch_shortcut_paths


@dataclass
class SurgeryResult:
    """What ``add_skips`` did.

    ``module`` is the rewritten GraphModule (with ``SkipConfig.module``, a copy of
    the model of its own class with that submodule a rewritten GraphModule, and
    skip names its paths); ``skips`` one record per shortcut;
    ``spans`` every candidate (chosen or rejected with a reason); ``plan`` the
    plan that was applied; ``parity`` the measured output difference against
    the original (None when verify=False); ``method`` "fx", "export" or
    "graph"; ``residuals`` the residual connections the model already had (no
    shortcut is added inside or parallel to them); ``mode_baked`` the
    original's layers whose train-mode behaviour (drop-path, stochastic depth)
    the capture could not keep: the result computes them as in the mode the
    model was captured in (torch.export capture only; fx keeps them as modules).
    """

    module: fx.GraphModule | nn.Module
    skips: list[Skip]
    spans: list[Span]
    plan: SurgeryPlan
    parity: ParityReport | None
    method: str
    residuals: list[Residual] = field(default_factory=list)
    mode_baked: tuple[str, ...] = ()

    @property
    def params_added(self) -> int:
        return sum(s.params for s in self.skips)

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.plan.config.to_dict(),
                "inserted": len(self.skips), "skips": [s.to_dict() for s in self.skips],
                "params_added": self.params_added,
                "parity": self.parity.to_dict() if self.parity else None,
                "existing_residuals": [r.to_dict() for r in self.residuals],
                "mode_baked": list(self.mode_baked),
                "rejected": [s.to_dict() for s in self.spans if not s.chosen]}


@dataclass
class Inspection:
    """What ``inspect_model`` found: the traced graph, its layer tree and every candidate span."""

    gm: fx.GraphModule
    analysis: GraphAnalysis
    spans: list[Span]
    method: str

    @property
    def layers(self) -> list[Layer]:
        return self.analysis.layers

    @property
    def units(self) -> list[Layer]:
        return self.analysis.units

    @property
    def residuals(self) -> list[Residual]:
        return self.analysis.residuals

    @property
    def nodes(self) -> int:
        return len(self.analysis.nodes)

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "method": self.method,
                "layers": [lay.to_dict() for lay in self.layers],
                "existing_residuals": [r.to_dict() for r in self.residuals],
                "spans": [s.to_dict() for s in self.spans]}


def inspect_model(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
                  trace: TraceOptions | None = None) -> Inspection:
    """Trace ``model``, analyse its graph once, and judge every candidate span.

    Args:
        model: the network (not modified).
        example_inputs: tuple of tensors, as for torch.export.
        config: SkipConfig; defaults to SkipConfig().
        trace: how to capture the model (TraceOptions: leaf modules, concrete
            args, fake shapes).

    Returns:
        An Inspection: layers, existing residuals, spans, node count, capture method.

    Raises:
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.

    Example:
        >>> found = inspect_model(model, (torch.randn(1, 3, 32, 32),))   # doctest: +SKIP
        >>> len(found.layers), sum(s.chosen for s in found.spans)       # doctest: +SKIP
        (8, 3)
    """
    config = config or SkipConfig()
    if config.module is not None:  # the submodule alone, with the inputs the model gives it
        sub, sub_inputs = submodule_inputs(as_module(model), config.module,
                                           normalize_inputs(example_inputs))
        return inspect_model(sub, sub_inputs, replace(config, module=None), trace=trace)
    gm = trace_model(model, example_inputs, trace)
    analysis = analyze_graph(gm)
    spans = select_spans(analysis, config)
    return Inspection(gm=gm, analysis=analysis, spans=spans, method=capture_info(gm).method)


def find_spans(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
               trace: TraceOptions | None = None) -> list[Span]:
    """Every candidate span of ``model``, each chosen or rejected with a reason.

    Args:
        model: the network (not modified).
        example_inputs: tuple of tensors, as for torch.export.
        config: SkipConfig; defaults to SkipConfig().
        trace: how to capture the model (TraceOptions); ``fake=True`` records
            shapes with FakeTensors: no activation memory, the same spans.

    Returns:
        A list of Span in graph order; ``[s for s in spans if s.chosen]`` is the tiling.

    Raises:
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.

    Example:
        >>> spans = find_spans(model, (torch.randn(1, 3, 32, 32),), SkipConfig(span=2))  # doctest: +SKIP
        >>> sum(s.chosen for s in spans)                                                  # doctest: +SKIP
        4
    """
    return inspect_model(model, example_inputs, config, trace=trace).spans


def add_skips(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
              plan: SurgeryPlan | None = None, verify: bool = True,
              trace: TraceOptions | None = None) -> SurgeryResult:
    """Add residual shortcuts to ``model``; the model itself is never modified.

    Args:
        model: the network to rewrite: any nn.Module, an ExportedProgram or its
            ``.module()``, or the ``ModelRecord`` a reader returned (``read_model``).
        example_inputs: tuple of tensors, as for torch.export.
        config: SkipConfig; defaults to SkipConfig() (span 2, preserve, pre-activation).
        plan: apply this plan (e.g. an edited ``--plan-out`` file) instead of
            selecting spans; its config wins over ``config``.
        verify: measure the output difference against the original (eval mode).
        trace: how to capture the model (TraceOptions). With ``fake=True`` shapes
            are recorded with FakeTensors (no activation memory) while planning;
            ``verify`` still runs both models for real, so pair it with
            ``verify=False`` when the model is too large to run here.

    Returns:
        SurgeryResult with ``.module`` (GraphModule), ``.skips`` and ``.residuals``.

    Raises:
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.
        PlanError: the plan does not fit this model.
        VerificationError: init "preserve" changed the outputs beyond tolerance,
            or the rewritten model outputs NaN or infinity where the original does not.

    Example:
        >>> result = add_skips(model, (torch.randn(8, 64),), SkipConfig(span=2))  # doctest: +SKIP
        >>> result.module(torch.randn(8, 64)).shape                                 # doctest: +SKIP
    """
    inputs = normalize_inputs(example_inputs)
    # an ExportedProgram or its .module() refuses .eval(); a ModelRecord says what it knows
    record = model if isinstance(model, ModelRecord) else record_of(as_module(model))
    model = record.module
    path = (plan.config if plan is not None else config or SkipConfig()).module
    if path is not None:
        return _add_skips_in(path, model, inputs, config, plan, verify, trace)
    with gc_paused():
        gm = trace_model(record, inputs, trace)
        result = rewrite_traced(gm, inputs, config, plan=plan)
    if verify:
        outputs = _drop_nonfinite(result, inputs)
        # the original runs as it was captured: with the concrete args, and no KV cache
        concrete = {**record.forward_kwargs, **((trace and trace.concrete_args) or {})}
        result.parity = check_parity(model, result.module, inputs, original_kwargs=concrete,
                                     rewritten_outputs=outputs)
        _judge(result.parity, result.plan.config, bool(result.skips))
    return result


def _add_skips_in(path: str, model: nn.Module, inputs: tuple, config: SkipConfig | None,
                  plan: SurgeryPlan | None, verify: bool,
                  trace: TraceOptions | None) -> SurgeryResult:
    """``add_skips`` on the submodule at ``path``, spliced back into a copy of ``model``.

    The submodule is captured with the inputs it gets when the whole model runs
    the example; skip names and the plan's config say where it sits.
    """
    sub, sub_inputs = submodule_inputs(model, path, inputs)
    inner = add_skips(sub, sub_inputs, replace(config, module=None) if config else None,
                      plan=replace(plan, config=replace(plan.config, module=None))
                      if plan is not None else None, verify=verify, trace=trace)
    whole = splice(model, path, inner.module)
    result = replace(inner, module=whole,
                     skips=[replace(s, name=f"{path}.{s.name}") for s in inner.skips],
                     plan=replace(inner.plan, config=replace(inner.plan.config, module=path),
                                  input_shapes=tuple(tuple(t.shape) for t in inputs)))
    if verify:
        result.parity = check_parity(model, whole, inputs)
        _judge(result.parity, result.plan.config, bool(result.skips))
    return result


def rewrite_traced(gm: fx.GraphModule, inputs: tuple, config: SkipConfig | None = None, *,
                   plan: SurgeryPlan | None = None) -> SurgeryResult:
    """The pass after tracing: analyse once, select, plan, rewrite ``gm`` in place (no verify)."""
    config = plan.config if plan is not None else (config or SkipConfig())
    analysis = analyze_graph(gm)
    spans = select_spans(analysis, config)
    if plan is None:
        plan = plan_skips(spans, config, tuple(tuple(t.shape) for t in inputs))
    else:  # report what the plan does, not what automatic selection would have done
        spans = mark_planned(spans, {(s.source, s.target) for s in plan.skips})
    module, skips = apply_plan(gm, plan, analysis=analysis, inplace=True)
    info = capture_info(gm)
    return SurgeryResult(module=module, skips=skips, spans=spans, plan=plan, parity=None,
                         method=info.method, residuals=analysis.residuals,
                         mode_baked=info.mode_baked)


def _drop_nonfinite(result: SurgeryResult, inputs: tuple) -> list[torch.Tensor] | None:
    """Take out every shortcut whose path S(x) is not finite; its span says ``non-finite``.

    Returns the rewritten module's outputs from that run when it kept every
    shortcut (the parity check needs no second run), else None.
    """
    found, outputs = watch_shortcut_paths(result.module, inputs)
    bad = set(found)
    if not bad:
        return outputs
    gm = result.module
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in bad:
            node.replace_all_uses_with(node.args[0])  # the span's output, as before surgery
            gm.graph.erase_node(node)
    for name in bad:
        gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    dropped = {(s.source, s.target) for s in result.skips if s.name in bad}
    result.skips = [s for s in result.skips if s.name not in bad]
    result.plan = replace(result.plan, skips=tuple(
        p for p in result.plan.skips if (p.source, p.target) not in dropped))
    result.spans = [replace(s, reason=Reason.NON_FINITE) if (s.source, s.target) in dropped
                    else s for s in result.spans]
    return None


def _judge(parity: ParityReport, config: SkipConfig, inserted: bool) -> None:
    if parity.nonfinite:
        raise VerificationError(f"the rewritten model outputs NaN or infinity where the "
                                f"original does not ({parity.describe()}); this is a "
                                "ressurgeon bug, please report it")
    if config.init is Init.PRESERVE and inserted and not parity.ok:
        raise VerificationError(
            f"init 'preserve' changed the outputs by {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:g}); this is a ressurgeon bug, please report it")
