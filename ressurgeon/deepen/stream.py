"""Block expansion of a safetensors checkpoint on disk, one tensor at a time (LLaMA Pro).

``expand_checkpoint`` deepens a Hugging Face style checkpoint folder without
loading it: new blocks are copies of existing ones whose residual branches end
in zeroed output projections, so each new block is exactly the identity and the
deeper model computes what the original did (Wu et al. 2024, "LLaMA Pro").

Decide, then execute. Everything is checked from the shard headers and
config.json before a byte is written: the layer stack and its prefix, which
tensors to zero in each copy (``ZERO_RULES``), the new config. Then the output
shards are written into a scratch folder and moved into place when complete.
This module runs the three steps in order: read (``ressurgeon.load.safetensors``,
the headers and config.json), decide (``decide.py``; ``layer_config.py`` for
config.json), write (``write.py``).

Why not ``safetensors.safe_open``: it memory-maps each shard, and the pages a
read touches stay resident until the shard is closed, so reading a shard tensor
by tensor still peaks at the whole shard (measured: 67 MB for a 64 MB shard of
8 MB tensors). Here headers are parsed and checked as the format specifies, and
each tensor's bytes are copied with plain reads through one fixed buffer, so the
peak memory is ``2 * CHUNK_BYTES`` whatever the size of tensors and shards. The
bytes are copied verbatim: no dtype conversion, no rounding, no torch.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._io import scratch_dir
from ..errors import ConfigError, ExportError, LoadError
from ..load.safetensors import find_checkpoint, read_config, read_entries
from .decide import ZERO_RULES, StackPlan, _check_options, find_layer_stack, plan_stack, spread
from .layer_config import config_for
from .write import (DISK_ERRNOS, _check_dirs, _check_space, _other_files,
                    _plan_tensors, _publish, _split_shards, _write_index, _write_json,
                    _write_shards)

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ZERO_RULES", "ExpansionReport", "StackPlan",
           "checkpoint_stack", "config_for", "expand_checkpoint", "find_layer_stack",
           "plan_stack", "spread"]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9   # transformers' "5GB"


@dataclass(frozen=True)
class ExpansionReport:
    """What ``expand_checkpoint`` wrote: the new stack, the zeroed tensors, the files."""

    source: str
    dest: str
    prefix: str                       # the layer stack, e.g. "model.layers"
    layers_before: int
    layers_after: int
    new_layers: tuple[int, ...]       # indices of the new blocks in the expanded stack
    copied_from: tuple[int, ...]      # the original block each new block copies
    zero_rules: tuple[str, ...]       # per new block: the ZERO_RULES family, or "zero=[...]"
    zeroed: tuple[str, ...]           # tensors set to zero, by their new names
    bytes_written: int                # all files written, shards and others
    shards: tuple[str, ...]
    config_keys: tuple[str, ...]      # config.json keys changed, dotted ("text_config.layer_types")
    files_copied: tuple[str, ...]     # other files, copied unchanged
    files_skipped: tuple[str, ...]    # other weight files and subfolders, left out

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def expand_checkpoint(src_dir: str | Path, dst_dir: str | Path, *,
                      insert_after: list[int] | None = None, every: int | None = None,
                      blocks: int | None = None, prefix: str | None = None,
                      zero: str | list[str] = "auto", config: bool = True,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      dry_run: bool = False) -> ExpansionReport:
    """Deepen a safetensors checkpoint folder with identity blocks, streaming tensor by tensor.

    Each new block is a copy of the block it follows, with the output projections of its
    residual branches (and their biases) set to zero, so it passes its input through unchanged
    and the deeper model computes exactly what the original did, while every weight of the new
    block still receives a gradient. Later layers are renumbered. Needs pre-norm residual blocks.

    Args:
        src_dir: a folder with ``model.safetensors`` or sharded ``*.safetensors`` plus their
            ``*.safetensors.index.json``, usually ``config.json`` and tokenizer files.
        dst_dir: a new or empty folder, not inside ``src_dir``.
        insert_after: original block indices to insert a copy after (repeat one for two copies).
        every: insert a copy after every ``every``-th block.
        blocks: insert this many copies, spread evenly (LLaMA Pro's 32 -> 40 is ``blocks=8``).
        prefix: the layer stack's name prefix (``model.layers``); detected when None.
        zero: ``"auto"`` (``ZERO_RULES``) or the modules or tensors to zero in each copy, as
            name suffixes relative to a block (``["self_attn.o_proj", "mlp.down_proj"]``).
        config: rewrite config.json's layer count and per-layer entries; False copies it as is.
        max_shard_bytes: the largest output shard; one shard needs no index file.
        dry_run: decide and check everything, write nothing (``dst_dir`` is not checked; the
            report's ``bytes_written`` is what would be written to the shards).

    Returns:
        An ExpansionReport.

    Raises:
        ConfigError: not exactly one of insert_after/every/blocks, an index out of range, no
            or several layer stacks, post-norm blocks, nothing to zero, a config that cannot
            follow the new depth.
        LoadError: no safetensors checkpoint in ``src_dir``, or a damaged shard or index.
        ExportError: ``dst_dir`` is not new or empty, lies inside ``src_dir``, or the disk is
            too small; nothing is left there on failure.

    Example:
        >>> report = expand_checkpoint("llama-7b", "llama-pro-8b", blocks=8)  # doctest: +SKIP
        >>> report.layers_before, report.layers_after                        # doctest: +SKIP
        (32, 40)
    """
    src, dst = Path(src_dir), Path(dst_dir).resolve()
    _check_options(every, blocks, insert_after, zero)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be a positive number of bytes, got "
                          f"{max_shard_bytes!r}")
    if not dry_run:
        _check_dirs(src, Path(dst_dir))
    elif not src.is_dir():
        raise LoadError(f"{src} is not a folder; pass the checkpoint's folder")
    source = find_checkpoint(src)
    tensors, shard_metadata = read_entries(source)
    settings = read_config(src)
    plan = plan_stack({name: t.dtype for name, t in tensors.items()}, settings,
                      insert_after=insert_after, every=every, blocks=blocks, prefix=prefix,
                      zero=zero, config=config)
    prefix, sources, new_config = plan.prefix, plan.sources, plan.config
    outputs = _plan_tensors(tensors, plan)
    rules = [plan.zeroed[src_layer][0] for src_layer, is_new in sources if is_new]
    shards = _split_shards(outputs, max_shard_bytes, source.base)
    extras, skipped = _other_files(src, source, rewrite_config=new_config is not None)
    new = [i for i, (_, is_new) in enumerate(sources) if is_new]

    def report(written: int) -> ExpansionReport:
        return ExpansionReport(
            source=str(src), dest=str(dst_dir), prefix=prefix, layers_before=len(plan.layers),
            layers_after=len(sources), new_layers=tuple(new),
            copied_from=tuple(sources[i][0] for i in new), zero_rules=tuple(rules),
            zeroed=tuple(t.name for t in outputs if t.zero), bytes_written=written,
            shards=tuple(name for name, _ in shards), config_keys=plan.config_keys,
            files_copied=tuple(p.name for p in extras), files_skipped=tuple(skipped))

    if dry_run:
        return report(sum(t.source.nbytes for t in outputs))
    _check_space(dst, sum(t.source.nbytes for t in outputs)
                 + sum(p.stat().st_size for p in extras))

    try:
        with scratch_dir(dst / dst.name if dst.exists() else dst) as scratch:
            written = _write_shards(scratch, shards, shard_metadata)
            if len(shards) > 1:
                written += _write_index(scratch / f"{source.base}.safetensors.index.json",
                                        shards, source.index_metadata)
            for path in extras:
                shutil.copyfile(path, scratch / path.name)
                written += (scratch / path.name).stat().st_size
            if new_config is not None:
                written += _write_json(scratch / "config.json", new_config)
            _publish(scratch, dst)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise ExportError(f"cannot write {dst}: {exc.strerror}; nothing was written "
                          "there") from exc
    return report(written)


def checkpoint_stack(src_dir: str | Path, prefix: str | None = None) -> tuple[str, int]:
    """(the layer stack's prefix, its number of layers) of a checkpoint folder, from its shard
    headers and config.json alone, e.g. ``("model.layers", 32)``.

    Raises:
        LoadError: no safetensors checkpoint in the folder, or a damaged one.
        ConfigError: no layer stack, or several equally likely ones (pass ``prefix``).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise LoadError(f"{src} is not a folder; pass the checkpoint's folder")
    tensors, _ = read_entries(find_checkpoint(src))
    return find_layer_stack({n: t.dtype for n, t in tensors.items()}, read_config(src), prefix)
