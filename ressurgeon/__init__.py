"""ressurgeon: add residual (skip) connections to existing PyTorch networks.

    from ressurgeon import add_skips, find_spans, SkipConfig
    result = add_skips(model, (x,), SkipConfig(span=2, init="preserve"))
    result.module   # torch.fx.GraphModule, the rewritten model
    result.skips    # one Skip record per shortcut
"""

from .config import SkipConfig
from .errors import (ConfigError, ExportError, LoadError, PlanError, RessurgeonError,
                     ShapeError, TraceError, UnsafeFileError, VerificationError)
from .blocks import Residual
from .diagnose import FlowStats, GradientFlowReport, LayerFlow, gradient_flow
from .gates import Gate, GateReport, gate_report
from .fold import FoldedSkip, FoldResult, fold
from .onnx_export import ExportFallbackWarning, FusionReport, OnnxReport, export_onnx, fusion_report
from .plan import PlannedSkip, SurgeryPlan, plan_skips
from .registry import OpInfo, Role, register_op
from .rewrite import Skip, apply_plan
from .shortcuts import Shortcut
from .plot import plot_gradient_flow, plot_surgery
from .shapes import propagate_shapes
from .spans import Layer, Reason, Span, analyze_graph, find_layers, find_residuals, select_spans
from .surgery import SurgeryResult, add_skips, find_spans
from .trace import default_leaf_modules, trace_model
from .verify import GradientReport, ParityReport, check_gradients, check_parity

__version__ = "0.1.0"

__all__ = [
    "SkipConfig", "add_skips", "find_spans", "SurgeryResult", "Skip", "Span", "Reason",
    "Layer", "find_layers", "select_spans", "trace_model", "apply_plan", "plan_skips",
    "SurgeryPlan", "PlannedSkip", "Shortcut", "check_parity", "check_gradients",
    "ParityReport", "GradientReport", "register_op", "OpInfo", "Role",
    "RessurgeonError", "ConfigError", "LoadError", "UnsafeFileError", "TraceError",
    "ShapeError", "PlanError", "ExportError", "VerificationError", "__version__",
    "fold", "FoldResult", "FoldedSkip", "export_onnx", "OnnxReport", "FusionReport",
    "fusion_report", "ExportFallbackWarning", "Residual", "find_residuals", "analyze_graph",
    "default_leaf_modules", "propagate_shapes", "gradient_flow", "gate_report",
    "GradientFlowReport", "LayerFlow", "FlowStats", "GateReport", "Gate", "plot_surgery",
    "plot_gradient_flow",
]
