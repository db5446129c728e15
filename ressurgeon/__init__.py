"""ressurgeon: add residual (skip) connections to existing PyTorch networks.

    from ressurgeon import add_skips, find_spans, SkipConfig
    result = add_skips(model, (x,), SkipConfig(span=2, init="preserve"))
    result.module   # torch.fx.GraphModule, the rewritten model
    result.skips    # one Skip record per shortcut

The package imports lazily: a name is imported from its module the first time
it is used, so ``import ressurgeon`` (and ``ressurgeon --help``) costs no torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it, grouped by what a user reaches for.
_EXPORTS = {
    # the pipeline, stage by stage
    "load_model": "load", "read_model": "load", "record_of": "load.record",
    "from_torchscript": "load", "trace_model": "capture.trace", "analyze_graph": "analysis.layers",
    "find_spans": "skips.surgery", "select_spans": "skips.select", "inspect_model": "skips.surgery",
    "plan_skips": "skips.plan", "apply_plan": "skips.rewrite", "add_skips": "skips.surgery",
    "check_parity": "verify", "check_gradients": "verify", "compare_outputs": "verify",
    "save_model": "save", "save_code": "save", "prepare_code": "save", "export_onnx": "onnx_export",
    "fusion_report": "onnx_export", "fold": "fold", "deepen": "deepen",
    "expand_checkpoint": "deepen", "rewire": "rewire", "load_adapter": "rewire",
    "unwrap": "rewire",
    # diagnostics
    "gradient_flow": "diagnose", "gate_report": "gates", "plot_surgery": "plot",
    "plot_gradient_flow": "plot", "find_shortcuts": "shortcuts", "find_layers": "analysis.layers",
    "find_residuals": "analysis.layers",
    # configuration
    "SkipConfig": "config", "TraceOptions": "config", "Init": "config", "Kind": "config",
    "Placement": "config", "DeepenConfig": "config", "How": "config",
    "RewireConfig": "config",
    # records and results
    "SurgeryResult": "skips.surgery", "Inspection": "skips.surgery", "Skip": "skips.rewrite", "Span": "skips.select",
    "Reason": "skips.select", "Layer": "analysis.layers", "Residual": "analysis.blocks",
    "SurgeryPlan": "skips.plan", "PlannedSkip": "skips.plan", "ParityReport": "verify",
    "GradientReport": "verify", "FoldResult": "fold", "FoldedSkip": "fold",
    "FoldedRewire": "fold",
    "OnnxReport": "onnx_export", "FusionReport": "onnx_export",
    "GradientFlowReport": "diagnose", "LayerFlow": "diagnose", "FlowStats": "diagnose",
    "GateReport": "gates", "Gate": "gates", "Shortcut": "shortcuts",
    "ExportFallbackWarning": "onnx_export", "DeepenResult": "deepen", "DeepenPlan": "deepen",
    "NewBlock": "deepen", "ResidualLayer": "deepen", "ExpansionReport": "deepen",
    "RewireResult": "rewire", "ModelRecord": "load.record",
    # errors
    "RessurgeonError": "errors", "ConfigError": "errors", "LoadError": "errors",
    "UnsafeFileError": "errors", "TraceError": "errors", "ShapeError": "errors",
    "PlanError": "errors", "ExportError": "errors", "VerificationError": "errors",
    # extension points
    "register_op": "registry", "OpInfo": "registry", "Role": "registry", "Trait": "registry",
    "default_leaf_modules": "capture.trace",
    # for the command line and tools built on it: inputs, files, checks
    "example_inputs": "inputs", "real_inputs": "inputs", "read_weights": "load",
    "CheckpointNote": "load.checkpoint", "check_format": "save", "model_dynamic_dims": "save",
    "FixedDimsWarning": "save", "atomic_path": "_io", "check_writable": "_io", "check_output": "_io", "read_plan_text": "plans",
    "check_code_folder": "_io", "deepen_folder": "deepen.folder",
    "check_expanded": "deepen.folder", "describe_blocks": "rewire", "ADAPTER_FILES": "rewire", "register_rewiring": "catalog", "Rewiring": "rewire",
    "register_join": "catalog", "register_pattern": "catalog",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ressurgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``ressurgeon.fold`` the function when the ``ressurgeon.fold`` package loads.

    Python's import system sets every newly loaded submodule as an attribute of
    its parent; the stage package ``fold/`` would then hide the function of the
    same name from ``from ressurgeon import fold``.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .analysis.blocks import Residual
    from .analysis.layers import Layer, analyze_graph, find_layers, find_residuals
    from .config import (DeepenConfig, How, Init, Kind, Placement, RewireConfig, SkipConfig,
                         TraceOptions)
    from .deepen import (DeepenPlan, DeepenResult, ExpansionReport, NewBlock, ResidualLayer,
                         deepen, expand_checkpoint)
    from .diagnose import FlowStats, GradientFlowReport, LayerFlow, gradient_flow
    from .errors import (ConfigError, ExportError, LoadError, PlanError, RessurgeonError,
                         ShapeError, TraceError, UnsafeFileError, VerificationError)
    from .fold import FoldedSkip, FoldResult, fold
    from .gates import Gate, GateReport, gate_report
    from .load import from_torchscript, load_model
    from .onnx_export import ExportFallbackWarning, FusionReport, OnnxReport, export_onnx, fusion_report
    from .skips.plan import PlannedSkip, SurgeryPlan, plan_skips
    from .plot import plot_gradient_flow, plot_surgery
    from .registry import OpInfo, Role, Trait, register_op
    from .catalog import register_join, register_pattern, register_rewiring
    from .rewire import RewireResult, Rewiring, load_adapter, rewire, unwrap
    from .skips.rewrite import Skip, apply_plan
    from .save import prepare_code, save_code, save_model
    from .shortcuts import Shortcut, find_shortcuts
    from .skips.select import Reason, Span, select_spans
    from .skips.surgery import Inspection, SurgeryResult, add_skips, find_spans, inspect_model
    from .capture.trace import default_leaf_modules, trace_model
    from .verify import GradientReport, ParityReport, check_gradients, check_parity, compare_outputs
