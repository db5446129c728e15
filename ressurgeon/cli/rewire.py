"""rewire: DWA or hyper-connections on a model's residual stream, written as an adapter folder."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import REWIRE_KINDS, RewireConfig
from ..errors import ConfigError
from .common import (ArchOpt, DebugOpt, DeviceOpt, DtypeOpt, InputShapeOpt, JsonOpt, QuietOpt,
                     TrustOpt, VocabOpt, load_with_inputs, session)

_HELP = {f.name: f.metadata["help"] for f in fields(RewireConfig)}
_DEFAULT = RewireConfig()
_HYPER = RewireConfig(kind="hyper")


def rewire_cmd(
    model: Annotated[Path, typer.Argument(
        help="A Hugging Face save_pretrained folder (config.json + model.safetensors), or a "
        "weights file with --arch (any model whose forward runs a block list).",
        show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The adapter folder to write (rewire_config.json + "
        "rewire.safetensors: only the new parameters); load it with "
        "ressurgeon.load_adapter(base_model, folder). Default: MODEL-<kind> beside the input.",
        show_default=False)] = None,
    kind: Annotated[str, typer.Option(
        "--kind", metavar="|".join(REWIRE_KINDS), help=_HELP["kind"])] = _DEFAULT.kind,
    dilation: Annotated[int, typer.Option("--dilation", help=_HELP["dilation"])] = 1,
    period: Annotated[int, typer.Option("--period", help=_HELP["period"])] = 1,
    n: Annotated[int, typer.Option("--n", "-n", help=_HELP["n"])] = _HYPER.n,
    dynamic: Annotated[bool, typer.Option("--dynamic", help=_HELP["dynamic"])] = False,
    mhc: Annotated[bool, typer.Option("--mhc", help=_HELP["mhc"])] = False,
    list_blocks: Annotated[bool, typer.Option(
        "--list", help="Only list the blocks found and what each kind makes of them; write "
        "nothing.")] = False,
    input_shape: InputShapeOpt = None,
    vocab: VocabOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Give MODEL's residual stream DenseFormer's depth-weighted average or hyper-connections.

    The blocks of the model's layer list are wrapped; the rewired model computes
    exactly what MODEL did (checked on example inputs; mHC within its stated
    bound, exit 3 beyond it), and only the new parameters are written, as an
    adapter folder. A transformers model stays its own class.

    Examples:

      ressurgeon rewire ./llama-folder --kind dwa -o ./llama-dwa

      ressurgeon rewire ./llama-folder --kind dwa --dilation 4 --period 5 --json

      ressurgeon rewire ./gpt2-folder --kind hyper -n 4 --dynamic -o ./gpt2-hc

      ressurgeon rewire ./gpt2-folder --list
    """
    with session(as_json=as_json, quiet=quiet, debug=debug) as out:
        # inplace: the model loaded here is ours, so no second copy of its weights is made
        config = RewireConfig(kind=kind, dilation=dilation, period=period, n=n,
                              dynamic=dynamic, mhc=mhc, inplace=True)
        target = None if list_blocks else (output or model.with_name(f"{model.name}-{kind}"))
        if target is not None:
            _check_output(model, target)
        net, inputs = load_with_inputs(model, input_shape, arch, trust_pickle, dtype, device,
                                       out, vocab=vocab)
        if list_blocks:
            from .. import describe_blocks

            rows = describe_blocks(net)
            out.emit({"blocks": rows}, lambda: _show_blocks(out, rows))
            return
        with out.step(f"rewiring ({kind}) and checking the outputs"):
            from .. import rewire

            result = rewire(net, inputs, config)
        with out.step(f"writing {target}"):
            result.save_adapter(target)

        def show() -> None:
            _show_result(out, result)
            out.note(f"outputs {'unchanged' if result.exact else 'within the mHC bound'}: "
                     f"{result.parity.describe()}")
            out.note(f"wrote {target}/ ({result.params_added:,} parameters); load it with "
                     "ressurgeon.load_adapter(base_model, folder)")

        out.emit({**result.to_dict(), "output": str(target)}, show)


def _check_output(model: Path, target: Path) -> None:
    """The adapter folder is not the input nor inside it, and holds no one else's files."""
    from .. import ADAPTER_FILES

    if target.is_symlink():
        raise ConfigError(f"-o {target} is a symbolic link; ressurgeon never writes through a "
                          "link: give a new folder")
    src, dst = model.resolve(), target.resolve()
    if dst == src or src in dst.parents or (src.is_file() and dst == src.parent):
        raise ConfigError(f"-o {target} is the input or inside it; ressurgeon never writes into "
                          "its input: choose another folder")
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"-o {target} is a file; give a folder for the adapter")
        others = sorted(p.name for p in target.iterdir() if p.name not in ADAPTER_FILES)
        if others:
            raise ConfigError(f"-o {target} holds other files ({', '.join(others[:3])}); give a "
                              "new folder or an adapter folder ressurgeon wrote")


def _show_blocks(out, rows: list[dict]) -> None:
    from .render import _table

    table = _table(f"Blocks found ({len(rows)})", "dwa takes every block; hyper needs a "
                   "pre-norm block whose sublayers it knows")
    for col in ("block", "class", "params", "hyper"):
        table.add_column(col, no_wrap=col != "hyper")
    for r in rows:
        table.add_row(r["name"], r["class"], f"{r['params']:,}",
                      r["hyper_form"] or f"refused: {r['hyper_refused']}")
    out.table(table)


def _show_result(out, result) -> None:
    from .render import _table

    table = _table(f"Rewired blocks: {result.description}",
                   f"total: {len(result.blocks)} block(s), {result.params_added:,} parameters "
                   "added")
    table.add_column("block", no_wrap=True)
    table.add_column("class", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("reads", no_wrap=True)
    for r in result.block_records():
        reads = (f"form {r['form']}" if "form" in r else
                 "-" if r["averages"] is None else "Y" + ",Y".join(map(str, r["averages"])))
        table.add_row(r["name"], r["class"], f"{r['params']:,}", reads)
    out.table(table)
