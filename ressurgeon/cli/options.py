"""The command line's shared options: typer ``Annotated`` aliases, their help from the config.

SkipConfig's fields become flags with the help text of the dataclass field
itself and the choices of its enum, so the CLI and the library describe each
setting once. Nothing here imports torch: ``ressurgeon --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..catalog import JOINS, PATTERNS
from ..config import Init, Kind, Placement, SkipConfig

__all__ = ["DEFAULTS", "FIELDS", "cfg_help", "config_from_flags", "SpanOpt", "KindOpt", "InitOpt",
           "JoinOpt", "PlacementOpt", "IncludeOpt", "ExcludeOpt", "MaxSkipsOpt", "SeedOpt",
           "MaxShareOpt", "KeyOpt", "PatternOpt", "ModuleOpt", "ModelArg",
           "InputShapeOpt", "VocabOpt", "ArchOpt", "TrustOpt", "DtypeOpt", "DeviceOpt", "LeafOpt",
           "FakeOpt", "ConcreteOpt", "DynamicOpt", "PlanOutOpt", "PlotOpt", "WideOpt", "JsonOpt",
           "QuietOpt", "DebugOpt", "OnnxOpt", "OpsetOpt", "Fp16Opt", "StaticBatchOpt",
           "NoCheckOpt"]

FIELDS = {f.name: f for f in fields(SkipConfig)}
DEFAULTS = SkipConfig()


def cfg_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def _choice(flag: str, enum) -> typer.models.OptionInfo:
    """A flag whose values are an enum's: listed in --help, completed by the shell, and
    checked by SkipConfig (so a bad value is a one-line error naming the choices)."""
    values = [getattr(m, "value", m) for m in enum]  # an enum, or a catalog table's names
    return typer.Option(flag, metavar="|".join(values), show_default=True,
                        help=cfg_help(flag.lstrip("-")),
                        autocompletion=lambda incomplete: [v for v in values
                                                           if v.startswith(incomplete)])


# SkipConfig fields as flags: the help text comes from the dataclass field itself,
# the choices from its enum.
SpanOpt = Annotated[int, typer.Option("--span", help=cfg_help("span"))]
KindOpt = Annotated[str, _choice("--kind", Kind)]
InitOpt = Annotated[str, _choice("--init", Init)]
JoinOpt = Annotated[str, _choice("--join", JOINS)]
PatternOpt = Annotated[str, _choice("--pattern", PATTERNS)]
PlacementOpt = Annotated[str, _choice("--placement", Placement)]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="PATTERN", help=cfg_help("include"), show_default=False)]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="PATTERN", help=cfg_help("exclude"), show_default=False)]
MaxSkipsOpt = Annotated[Optional[int], typer.Option(
    "--max-skips", help=cfg_help("max_skips"), show_default=False)]
ModuleOpt = Annotated[Optional[str], typer.Option(
    "--module", metavar="NAME", help=cfg_help("module"), show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help=cfg_help("seed"), show_default=False)]
MaxShareOpt = Annotated[float, typer.Option(
    "--max-projection-share", metavar="SHARE", help=cfg_help("max_projection_share"))]

# Options shared by several commands (typer builds flags from these annotations).
ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2 archive, .pt/.pth state_dict "
                                          "(with --arch), .safetensors (with --arch), a pickled "
                                          "module of torch.nn classes, or any other pickled "
                                          "module or TorchScript file (with --trust-pickle); or "
                                          "a Hugging Face save_pretrained folder (config.json + "
                                          "model.safetensors; needs transformers).",
                                          show_default=False)]
InputShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--input-shape", "-i", metavar="SHAPE[:DTYPE]", help="Example input shape, e.g. 1,3,224,224; "
    "add a dtype for integer inputs, e.g. 2,8:int64 for token ids; repeat for models with "
    "several inputs. Defaults to the shapes and dtypes stored in a .pt2 archive, or for a "
    "Hugging Face folder to its config's (1,16:int64 token ids, or 1,C,H,W images).",
    show_default=False)]
VocabOpt = Annotated[Optional[int], typer.Option(
    "--vocab", metavar="N", help="Integer example inputs are drawn from [0, N); default: a "
    "Hugging Face model's input embedding, else the smallest nn.Embedding of the model (else "
    "2).", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="module:callable that builds the architecture for a weights file "
    "(imported from the current folder or PYTHONPATH).", show_default=False)]
KeyOpt = Annotated[Optional[str], typer.Option(
    "--key", help="For a training checkpoint (a dict that holds the state_dict): the entry to "
    "load with --arch, e.g. state_dict_ema. Default: its one dict of tensors, else the first of "
    "model_state_dict, state_dict, model, module, net, network, state_dict_ema, model_ema. A "
    "prefix every key shares (model., module.) is stripped when the rest fits --arch exactly.",
    show_default=False)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading that runs code from the file: a pickle of classes "
    "other than torch.nn's, a .pt2 that holds pickles, a TorchScript file. Only for files you "
    "made yourself.")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Model and input dtype: float32, float16, bfloat16 or float64.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="PATTERN", help="Glob on module names or class names that tracing keeps "
    "opaque (repeatable).", show_default=False)]
FakeOpt = Annotated[bool, typer.Option(
    "--fake", help="Record shapes with FakeTensors (no activation memory, no arithmetic) for "
    "large models; the parity check still runs the real model, so pair it with --no-verify "
    "where the model cannot run here.")]
ConcreteOpt = Annotated[Optional[list[str]], typer.Option(
    "--concrete", metavar="NAME=VALUE", help="Fix a non-tensor forward argument while tracing, "
    "e.g. --concrete features_only=True (value as a Python literal; repeatable).",
    show_default=False)]
DynamicOpt = Annotated[Optional[list[str]], typer.Option(
    "--dynamic", metavar="[INPUT:]DIM", help="Keep this dim symbolic when torch.export captures "
    "or saves the model, e.g. --dynamic 1 for the sequence dim of every input, --dynamic 0:1 "
    "for input 0 only (repeatable). The batch (dim 0) is dynamic already.", show_default=False)]
PlanOutOpt = Annotated[Optional[Path], typer.Option(
    "--plan-out", help="Write the plan as JSON, to edit and apply again with --plan.",
    show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE.png", help="Also draw a figure (.png, .svg or .pdf); needs "
    "matplotlib: pip install 'ressurgeon\\[plot]'.", show_default=False)]
WideOpt = Annotated[bool, typer.Option(
    "--wide", help="Show every column (full shapes, module names, reasons) even if the "
    "table gets wider than 80 columns.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]

# Options shared by every command that writes ONNX.
OnnxOpt = Annotated[Optional[Path], typer.Option(
    "--onnx", metavar="OUT.onnx", help="Also write the model as ONNX (dynamo exporter, checked "
    "with onnx.checker and, when onnxruntime is installed, against PyTorch at two batch sizes).",
    show_default=False)]
OpsetOpt = Annotated[Optional[int], typer.Option(
    "--opset", help="ONNX opset version (default: the exporter's own, 18+).", show_default=False)]
Fp16Opt = Annotated[bool, typer.Option(
    "--fp16", help="Convert the model to float16 before the ONNX export (parity is measured "
    "against the float32 model).")]
StaticBatchOpt = Annotated[bool, typer.Option(
    "--static-batch", help="Fix the ONNX batch size to the example's instead of a symbolic "
    "'batch' dimension.")]
NoCheckOpt = Annotated[bool, typer.Option(
    "--no-check", help="Skip the ONNX Runtime parity run (the checker still runs).")]


def config_from_flags(*, span: int = DEFAULTS.span, kind=DEFAULTS.kind, init=DEFAULTS.init,
                      join=DEFAULTS.join, pattern=DEFAULTS.pattern,
                      placement=DEFAULTS.placement, module: str | None = None,
                      include: list[str] | None = None, exclude: list[str] | None = None,
                      max_skips: int | None = None,
                      max_projection_share: float | None = DEFAULTS.max_projection_share,
                      seed: int | None = DEFAULTS.seed) -> SkipConfig:
    """The SkipConfig the shared flags describe (validated: ConfigError names the flag's field)."""
    share = max_projection_share if max_projection_share is None or max_projection_share > 0 \
        else None   # the CLI's "no limit"
    return SkipConfig(span=span, kind=kind, init=init, join=join, placement=placement,
                      include=tuple(include or ()), exclude=tuple(exclude or ()),
                      max_skips=max_skips, max_projection_share=share, seed=seed,
                      pattern=pattern, module=module)


