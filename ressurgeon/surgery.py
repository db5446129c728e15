"""The whole pass in one call: trace -> find spans -> plan -> rewrite -> verify."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.nn as nn
from torch import fx

from .blocks import Residual
from .config import SkipConfig
from .errors import VerificationError
from .plan import SurgeryPlan, plan_skips
from .rewrite import Skip, apply_plan
from .spans import Span, analyze_graph, mark_planned, select_spans
from .trace import META, normalize_inputs, trace_model
from .verify import ParityReport, check_parity


@dataclass
class SurgeryResult:
    """What ``add_skips`` did.

    ``module`` is the rewritten GraphModule; ``skips`` one record per shortcut;
    ``spans`` every candidate (chosen or rejected with a reason); ``plan`` the
    plan that was applied; ``parity`` the measured output difference against
    the original (None when verify=False); ``method`` "fx" or "export";
    ``residuals`` the residual connections the model already had (no shortcut
    is added inside or parallel to them).
    """

    module: fx.GraphModule
    skips: list[Skip]
    spans: list[Span]
    plan: SurgeryPlan
    parity: ParityReport | None
    method: str
    residuals: list[Residual] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return sum(s.params for s in self.skips)

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.plan.config.to_dict(),
                "skips": [s.to_dict() for s in self.skips],
                "params_added": self.params_added,
                "parity": self.parity.to_dict() if self.parity else None,
                "existing_residuals": [r.to_dict() for r in self.residuals],
                "rejected": [s.to_dict() for s in self.spans if not s.chosen]}


def find_spans(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
               leaf_modules: Iterable[str] = (), concrete_args: dict | None = None,
               fake: bool = False) -> list[Span]:
    """Every candidate span of ``model``, each chosen or rejected with a reason.

    Args:
        model: the network (not modified).
        example_inputs: tuple of tensors, as for torch.export.
        config: SkipConfig; defaults to SkipConfig().
        leaf_modules: glob patterns of modules fx should keep opaque.
        concrete_args: values for non-tensor forward arguments (see ``trace_model``).
        fake: record shapes with FakeTensors instead of running the model: no
            activation memory, no arithmetic; the spans are the same.

    Returns:
        A list of Span in graph order; ``[s for s in spans if s.chosen]`` is the tiling.

    Raises:
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.

    Example:
        >>> spans = find_spans(model, (torch.randn(1, 3, 32, 32),), SkipConfig(span=2))  # doctest: +SKIP
        >>> sum(s.chosen for s in spans)                                                  # doctest: +SKIP
        4
    """
    config = config or SkipConfig()
    gm = trace_model(model, example_inputs, leaf_modules=leaf_modules,
                     concrete_args=concrete_args, fake=fake)
    return select_spans(gm, config)


def add_skips(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
              plan: SurgeryPlan | None = None, verify: bool = True,
              leaf_modules: Iterable[str] = (), concrete_args: dict | None = None,
              fake: bool = False) -> SurgeryResult:
    """Add residual shortcuts to ``model``; the model itself is never modified.

    Args:
        model: the network to rewrite.
        example_inputs: tuple of tensors, as for torch.export.
        config: SkipConfig; defaults to SkipConfig() (span 2, preserve, pre-activation).
        plan: apply this plan (e.g. an edited ``--plan-out`` file) instead of
            selecting spans; its config wins over ``config``.
        verify: measure the output difference against the original (eval mode).
        leaf_modules: glob patterns of modules fx should keep opaque.
        concrete_args: values for non-tensor forward arguments (see ``trace_model``).
        fake: record shapes with FakeTensors (no activation memory) while planning;
            ``verify`` still runs both models for real, so pair it with
            ``verify=False`` when the model is too large to run here.

    Returns:
        SurgeryResult with ``.module`` (GraphModule), ``.skips`` and ``.residuals``.

    Raises:
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.
        PlanError: the plan does not fit this model.
        VerificationError: init "preserve" changed the outputs beyond tolerance.

    Example:
        >>> result = add_skips(model, (torch.randn(8, 64),), SkipConfig(span=2))  # doctest: +SKIP
        >>> result.module(torch.randn(8, 64)).shape                                 # doctest: +SKIP
    """
    inputs = normalize_inputs(example_inputs)
    config = plan.config if plan is not None else (config or SkipConfig())
    gm = trace_model(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                     fake=fake)
    residuals = analyze_graph(gm).residuals
    spans = select_spans(gm, config)
    if plan is None:
        plan = plan_skips(spans, config, tuple(tuple(t.shape) for t in inputs))
    else:  # report what the plan does, not what automatic selection would have done
        spans = mark_planned(spans, {(s.source, s.target) for s in plan.skips})
    module, skips = apply_plan(gm, plan, inplace=True)
    parity = check_parity(model, module, inputs, original_kwargs=concrete_args) if verify else None
    if parity is not None and config.init == "preserve" and skips and not parity.ok:
        raise VerificationError(
            f"init 'preserve' changed the outputs by {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:g}); this is a ressurgeon bug, please report it")
    return SurgeryResult(module=module, skips=skips, spans=spans, plan=plan, parity=parity,
                         method=gm.meta[META]["method"], residuals=residuals)
