"""deepen: grow a model with new residual blocks that start as exactly the identity."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import DeepenConfig, How
from ..errors import ConfigError
from . import render
from .common import load_with_inputs
from .options import (KeyOpt, ArchOpt, ConcreteOpt, DebugOpt, DeviceOpt, DtypeOpt, DynamicOpt, Fp16Opt,
                      InputShapeOpt, JsonOpt, LeafOpt, NoCheckOpt, OnnxOpt, OpsetOpt, PlanOutOpt,
                      QuietOpt, StaticBatchOpt, TrustOpt, VocabOpt, WideOpt)
from .output import Output, session
from .parsing import check_paths, default_output, parse_input, trace_from_flags
from .surgery import write_results

_HELP = {f.name: f.metadata["help"] for f in fields(DeepenConfig)}


def deepen_cmd(
    model: Annotated[Path, typer.Argument(
        help="Model file (as for add-skips: .pt2, a state_dict with --arch, ...) or a Hugging "
        "Face checkpoint folder (save_pretrained's: *.safetensors and config.json), which is "
        "expanded on disk tensor by tensor.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the deeper model (.pt2, .pt, .safetensors), or "
        "a new folder for a checkpoint folder. Default: MODEL.deeper.pt2 (a folder: "
        "MODEL-deeper) beside the input.", show_default=False)] = None,
    blocks: Annotated[Optional[int], typer.Option(
        "--blocks", "-n", help=_HELP["blocks"], show_default=False)] = None,
    where: Annotated[Optional[list[str]], typer.Option(
        "--where", metavar="PATTERN", help=_HELP["where"] + " For a folder: layer names "
        "(model.layers.3) or indices (3).", show_default=False)] = None,
    how: Annotated[str, typer.Option(
        "--how", metavar="|".join(h.value for h in How), help=_HELP["how"])] = How.AUTO.value,
    zero: Annotated[Optional[list[str]], typer.Option(
        "--zero", metavar="NAME", help=_HELP["zero"], show_default=False)] = None,
    prefix: Annotated[Optional[str], typer.Option(
        "--prefix", metavar="PATH", help=_HELP["prefix"], show_default=False)] = None,
    module: Annotated[Optional[str], typer.Option(
        "--module", metavar="NAME", help=_HELP["module"], show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    plan: Annotated[Optional[Path], typer.Option(
        "--plan", help="Apply this plan (JSON from --plan-out, maybe edited: drop a block, "
        "repeat a position) instead of choosing; its settings win over the flags.",
        show_default=False)] = None,
    plan_out: PlanOutOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Decide and verify, but write no model or ONNX; only --plan-out is "
        "written.")] = False,
    onnx: OnnxOpt = None,
    opset: OpsetOpt = None,
    fp16: Fp16Opt = False,
    static_batch: StaticBatchOpt = False,
    no_check: NoCheckOpt = False,
    arch: ArchOpt = None,
    key: KeyOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    leaf: LeafOpt = None,
    concrete: ConcreteOpt = None,
    dynamic: DynamicOpt = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip running both models to check the outputs are unchanged (for "
        "a folder: loading both with transformers; skip it for checkpoints larger than "
        "memory).")] = False,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Grow MODEL with new residual blocks that start as exactly the identity.

    Residual stacks (transformer layers, ResNet, ConvNeXt or ViT blocks) get
    copies of their blocks with the end of each residual branch zeroed (LLaMA
    Pro's block expansion); plain networks get new layers x + out(act(layer(x)))
    with out zeroed. The deeper model computes exactly what MODEL did, and
    fine-tuning moves the zeroed weights from the first step; 'ressurgeon fold'
    removes new blocks that are still zero.

    Examples:

      ressurgeon deepen vit.pt2 --blocks 4 -o vit_deeper.pt2

      ressurgeon deepen mlp.pt2 --how new --where '6' --where '10' --json

      ressurgeon deepen vgg.pt2 -n 2 --plan-out plan.json --dry-run

      ressurgeon deepen llama-7b/ --blocks 8 -o llama-pro-8b/

      ressurgeon deepen resnet.pt2 -n 2 -o deeper.pt2 --onnx deeper.onnx
    """
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        from .. import DeepenPlan

        loaded_plan = DeepenPlan.load(plan) if plan else None
        config = loaded_plan.config if loaded_plan else DeepenConfig(
            blocks=blocks, how=how, where=tuple(where or ()), zero=tuple(zero or ()),
            prefix=prefix, module=module)
        if model.is_dir():
            if plan or plan_out or onnx:
                raise ConfigError("--plan, --plan-out and --onnx apply to model files; for a "
                                  "checkpoint folder use --blocks and --where")
            _deepen_folder(model, output, config, out, dry_run=dry_run, verify=not no_verify,
                           shapes=input_shape, vocab=vocab)
            return
        from .. import check_format

        trace = trace_from_flags(leaf=leaf, concrete=concrete, dynamic=dynamic)
        target = None if dry_run else (output or default_output(model, "deeper"))
        if dry_run:
            onnx = None
        check_paths([model, plan], {"-o": target, "--plan-out": plan_out, "--onnx": onnx})
        if target is not None:
            check_format(target)
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device, out,
                                       loaded_plan.input_shapes if loaded_plan else (),
                                       vocab=vocab, key=key)
        with out.step("tracing and inserting new blocks"):
            from .. import deepen

            result = deepen(net, inputs, config, plan=loaded_plan, verify=not no_verify,
                            trace=trace)
        written = write_results(result.module, result.plan, inputs, out, target=target,
                                plan_out=plan_out, onnx=onnx,
                                onnx_options=dict(opset=opset, fp16=fp16,
                                                  static_batch=static_batch, check=not no_check),
                                dynamic=trace.dynamic)

        def show() -> None:
            out.table(render.deepen_table(result, wide=wide))
            note = render.rejection_summary(result.positions)
            if note:
                out.note(note)
            if result.parity is not None:
                out.note(f"outputs unchanged: {result.parity.describe()}")

        out.emit({**result.to_dict(), "output": str(written["model"]) if written["model"] else None,
                  "fixed_dims": written["fixed_dims"],
                  "onnx": written["onnx"].to_dict() if written["onnx"] else None}, show)


def _deepen_folder(src: Path, output: Path | None, config: DeepenConfig, out: Output, *,
                   dry_run: bool, verify: bool, shapes, vocab) -> None:
    """A checkpoint folder: ``deepen_folder`` on disk, then (transformers) ``check_expanded``."""
    from .. import check_expanded, deepen_folder

    dst = output or src.with_name(f"{src.name}-deeper")
    with out.step(f"expanding {src}" if not dry_run else f"planning {src}"):
        report = deepen_folder(src, dst, config, dry_run=dry_run)
    parity = None
    if verify and not dry_run:
        shape = parse_input(shapes[0])[0] if shapes else (1, 8)
        with out.step("checking the expanded checkpoint with transformers"):
            parity = check_expanded(src, dst, shape=shape, vocab=vocab)
        if parity is None:
            out.note("not verified: transformers is not installed (pip install transformers)")
    if not dry_run:
        out.note(f"wrote {dst}/ ({report.bytes_written / 1e6:.1f} MB)")

    def show() -> None:
        out.table(render.expansion_table(report))
        if parity is not None:
            out.note(f"outputs unchanged (transformers AutoModel): {parity.describe()}")

    out.emit({"checkpoint": report.to_dict(), "dry_run": dry_run,
              "parity": parity.to_dict() if parity else None,
              "output": None if dry_run else str(dst)}, show)
