"""Block expansion of a safetensors checkpoint on disk, one tensor at a time (LLaMA Pro).

``expand_checkpoint`` deepens a Hugging Face style checkpoint folder without
loading it: new blocks are copies of existing ones whose residual branches end
in zeroed output projections, so each new block is exactly the identity and the
deeper model computes what the original did (Wu et al. 2024, "LLaMA Pro").

Decide, then execute. Everything is checked from the shard headers and
config.json before a byte is written: the layer stack and its prefix, which
tensors to zero in each copy (``ZERO_RULES``), the new config. Then the output
shards are written into a scratch folder and moved into place when complete.

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
import errno
import fnmatch
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._io import check_parent, check_writable, scratch_dir
from ..errors import ConfigError, ExportError, LoadError, brief

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ZERO_RULES", "ExpansionReport", "StackPlan",
           "checkpoint_stack", "config_for", "expand_checkpoint", "find_layer_stack",
           "plan_stack", "spread"]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9   # transformers' "5GB"
CHUNK_BYTES = 8 << 20                 # one read or write; two such buffers are all we hold
MAX_HEADER_BYTES = 100 << 20          # the reference reader's limit

# Bytes per element of the safetensors dtypes; in each of them all-zero bytes are the number 0.
# Other dtypes (F8_E8M0, F4, ...) are copied but never zeroed: zero bytes may not mean 0 there.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
               "BOOL": 1}

# Which modules end a block's residual branches, by family: zeroing their weight and bias makes
# a pre-norm block ``x + f(norm(x))`` the identity. Paths are relative to a block; ``*`` stands
# for one name part (an expert's index). A rule applies to a block when each of its paths
# matches there; of the rules that apply, the one zeroing the most tensors wins (a MoE rule with
# a shared expert beats the same rule without). Add a family here.
ZERO_RULES: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),   # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "mixtral": ("self_attn.o_proj", "block_sparse_moe.experts.*.w2"),
    "qwen-moe": ("self_attn.o_proj", "mlp.experts.*.down_proj"),
    "qwen2-moe": ("self_attn.o_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj"),
    "deepseek-moe": ("self_attn.o_proj", "mlp.experts.*.down_proj",
                     "mlp.shared_experts.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt-neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "gpt-j": ("attn.out_proj", "mlp.fc_out"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),   # also BLOOM
    "phi": ("self_attn.dense", "mlp.fc2"),
    "opt": ("self_attn.out_proj", "fc2"),
}

# Post-norm blocks, ``norm(x + f(x))``: a zero branch leaves ``norm(x)``, not x, so block
# expansion cannot start them as the identity. Known by model type, by a config flag, or by
# BERT's names (a ``LayerNorm`` beside the ``dense`` that ends the branch).
POST_NORM_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert", "deberta",
    "deberta-v2", "mpnet", "ernie", "bart", "marian"})
POST_NORM_FLAGS = {"do_layer_norm_before": False, "normalize_before": False,
                   "apply_residual_connection_post_layernorm": True}
NORM_NAMES = frozenset({"layernorm", "layer_norm"})
# Module names that end a residual branch in the families we know: ``zero="auto"`` refuses a
# block where its rule leaves one of these unzeroed (DeepSeek's shared_experts, say).
BRANCH_END_NAMES = frozenset({"o_proj", "down_proj", "out_proj", "c_proj", "dense",
                              "dense_4h_to_h", "fc_out", "fc2", "w2", "wo"})

# config.json: the layer count; per-layer lists are lists of that length, extended with each new
# layer's source entry (``layer_types``); index lists name layers and are renumbered.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
INDEX_LIST_KEYS = frozenset({"mlp_only_layers", "full_attn_idxs", "moe_layers",
                             "cross_attention_layers", "hybrid_layer_ids"})
NOT_PER_LAYER_KEYS = frozenset({"architectures", "bos_token_id", "eos_token_id",
                                "pad_token_id", "bad_words_ids", "suppress_tokens",
                                "begin_suppress_tokens"})


@dataclass(frozen=True)
class Schedule:
    """A config key that gives layers their kind by index (every k-th layer is MoE, say).

    Inserted layers would shift such a rule onto existing layers, so a config with one is
    refused unless the rule is off, neutral, or overridden by a per-layer list (which the
    expansion extends), or, for a first-k rule, every copy comes from a layer past the first k.
    """

    neutral: object = None           # the value under which every layer is alike
    listed_by: str | None = None     # the per-layer list that overrides the rule when present
    switch: str | None = None        # the flag without which the rule is off
    first_k: bool = False            # the first k layers differ from the rest


SCHEDULES = {
    "decoder_sparse_step": Schedule(neutral=1),                          # Qwen2/3-MoE
    "moe_layer_freq": Schedule(neutral=1),                               # DeepSeek-V2
    "moe_layer_interval": Schedule(neutral=1),                           # ERNIE 4.5 MoE
    "expert_layer_period": Schedule(neutral=1),                          # Jamba
    "attn_layer_period": Schedule(neutral=1),
    "cross_attention_frequency": Schedule(neutral=1),
    "first_k_dense_replace": Schedule(neutral=0, listed_by="mlp_layer_types", first_k=True),
    "interleave_moe_layer_step": Schedule(neutral=1, listed_by="moe_layers"),   # Llama 4
    "no_rope_layer_interval": Schedule(listed_by="no_rope_layers"),      # SmolLM3, Llama 4
    "global_attn_every_n_layers": Schedule(neutral=1, listed_by="layer_types"),
    "sliding_window_pattern": Schedule(neutral=1, listed_by="layer_types"),     # Gemma 3
    "_sliding_window_pattern": Schedule(neutral=1, listed_by="layer_types"),
    "max_window_layers": Schedule(listed_by="layer_types", switch="use_sliding_window"),  # Qwen2
}

DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)  # as _io
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                   ".index.json")


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


@dataclass(frozen=True)
class _Tensor:
    """One tensor of a source shard: where its bytes are (absolute offsets in ``file``)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Source:
    """The checkpoint in a folder: its shard files, its index (if sharded), their metadata."""

    base: str                   # "model" for model.safetensors or model-0000i-of-0000n
    files: tuple[Path, ...]
    index: Path | None
    weight_map: dict
    index_metadata: dict


@dataclass(frozen=True)
class _Out:
    """One tensor of the expanded checkpoint: its new name, its source, and whether it is zero."""

    name: str
    source: _Tensor
    zero: bool = False


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
    source = _find_source(src)
    tensors, shard_metadata = _read_tensors(source)
    settings = _read_config(src)
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


@dataclass(frozen=True)
class StackPlan:
    """The decision behind a block expansion, from tensor names alone: nothing is read or written.

    ``sources`` lists the expanded stack: per new index, the original layer it holds and
    whether it is a new copy; ``zeroed`` gives, per copied layer, the ZERO_RULES family (or
    "zero=[...]") and the tensors to zero in its copies, by name relative to the layer.
    """

    prefix: str
    layers: tuple[dict[str, str], ...]          # per layer: {name relative to it: full name}
    sources: tuple[tuple[int, bool], ...]
    zeroed: dict[int, tuple[str, frozenset[str]]]
    config: dict | None                         # config.json for the new depth (None: unchanged)
    config_keys: tuple[str, ...]                # its keys that changed, dotted


def plan_stack(dtypes: dict[str, str], settings: dict | None, *,
               insert_after: list[int] | None = None, every: int | None = None,
               blocks: int | None = None, prefix: str | None = None,
               zero: str | list[str] = "auto", config: bool = True) -> StackPlan:
    """Decide a block expansion from tensor names and dtypes: the stack, the copies, the zeros.

    The one decision ``expand_checkpoint`` (on disk) and ``ressurgeon.deepen`` (a Hugging Face
    model in memory) both execute.

    Args:
        dtypes: every tensor's name and safetensors dtype ("F32", "BF16", ...).
        settings: config.json as a dict (or None); its layer count picks the stack and its
            per-layer entries follow the new depth.
        insert_after, every, blocks, prefix, zero, config: as for ``expand_checkpoint``.

    Returns:
        A StackPlan.

    Raises:
        ConfigError: as ``expand_checkpoint``, for everything decided from names.
    """
    _check_options(every, blocks, insert_after, zero)
    prefix, layers = _find_stack(dtypes, prefix, _layer_counts(settings))
    _check_pre_norm(settings, prefix, layers)
    sources = _insertions(len(layers), insert_after, every, blocks)
    zeroed = _choose_zeros(dtypes, prefix, layers, sources, zero)
    new_config, keys = (_expand_config(settings, len(layers), sources)
                        if config and settings is not None else (None, []))
    return StackPlan(prefix=prefix, layers=tuple(layers), sources=tuple(sources), zeroed=zeroed,
                     config=new_config, config_keys=tuple(keys))


def find_layer_stack(dtypes: dict[str, str], settings: dict | None,
                     prefix: str | None = None) -> tuple[str, int]:
    """(the layer stack's prefix, its number of layers) from tensor names, as ``plan_stack``
    finds them.

    Raises:
        ConfigError: no stack, or several equally likely ones (pass ``prefix``).
    """
    prefix, layers = _find_stack(dtypes, prefix, _layer_counts(settings))
    return prefix, len(layers)


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
    tensors, _ = _read_tensors(_find_source(src))
    return find_layer_stack({n: t.dtype for n, t in tensors.items()}, _read_config(src), prefix)


def config_for(settings: dict, n: int, sources: list[tuple[int, bool]]) -> tuple[dict, list[str]]:
    """config.json (a copy) for the stack ``sources`` describes over ``n`` original layers, and
    the dotted keys that changed; ``sources`` as in ``StackPlan``.

    Raises:
        ConfigError: as ``plan_stack``, when the config cannot follow the new depth.
    """
    if not any(is_new for _, is_new in sources):
        return json.loads(json.dumps(settings)), []
    return _expand_config(settings, n, sources)


def spread(n: int, k: int) -> list[int]:
    """Which of ``n`` positions get the ``k`` new blocks, evenly: LLaMA Pro's 32 -> 40 is after
    every 4th (positions 3, 7, ..., 31), the last position always included."""
    return [(j + 1) * n // k - 1 for j in range(k)]


# -- checks of the arguments and folders --------------------------------------------------------

def _check_options(every, blocks, insert_after, zero) -> None:
    given = [name for name, value in (("insert_after", insert_after), ("every", every),
                                      ("blocks", blocks)) if value is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of insert_after=[...], every=N or blocks=N (got "
                          f"{', '.join(given) or 'none'})")
    for name, value in (("every", every), ("blocks", blocks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    if insert_after is not None and not insert_after:
        raise ConfigError("insert_after is empty; list at least one block index")
    if zero != "auto" and (isinstance(zero, str) or not zero
                           or not all(isinstance(z, str) and z for z in zero)):
        raise ConfigError(f"zero must be 'auto' or a non-empty list of names, got {zero!r}; "
                          "e.g. zero=['self_attn.o_proj', 'mlp.down_proj']")


def _check_dirs(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise LoadError(f"{src} is not a folder; pass the checkpoint's folder")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise ExportError(f"the destination {dst} lies inside the source {src}; give a folder "
                          "outside it")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ExportError(f"{dst} is a file or a link; give a new or empty folder")
    if dst.is_dir() and any(p for p in dst.iterdir() if not _ours(p, real_dst)):
        raise ExportError(f"{dst} is not empty; give a new or empty folder (nothing there is "
                          "overwritten)")
    check_writable(dst / "config.json" if dst.is_dir() else dst)


def _ours(path: Path, dst: Path) -> bool:
    """A scratch folder an earlier run left inside ``dst`` (scratch_dir removes it if stale)."""
    return path.name.startswith(f".{dst.name}.") and ".ressurgeon-tmp" in path.name


def _check_space(dst: Path, need: int) -> None:
    folder = dst if dst.is_dir() else check_parent(dst)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ExportError(f"the expanded checkpoint needs {need / 1e9:.1f} GB but {folder} has "
                          f"{free / 1e9:.1f} GB free; free space or choose another disk")


# -- reading: the files, their headers, config.json ---------------------------------------------

def _find_source(src: Path) -> _Source:
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise LoadError(f"{src} holds several index files ({indexes[0].name}, {indexes[1].name});"
                        " keep one checkpoint per folder")
    if not indexes:
        singles = sorted(p for p in src.glob("*.safetensors") if p.is_file())
        if len(singles) != 1:
            raise LoadError(f"{src} holds {len(singles) or 'no'} .safetensors files and no "
                            "*.safetensors.index.json; expected model.safetensors, or shards "
                            "with their index")
        return _Source(singles[0].name.removesuffix(".safetensors"), (singles[0],), None, {}, {})
    index = indexes[0]
    data = _load_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index} has no weight_map; write the index again")
    names = set(weight_map.values())
    bad = sorted(str(n) for n in names if not isinstance(n, str) or Path(n).name != n
                 or not (src / n).is_file())
    if bad:
        raise LoadError(f"{index} names {bad[0]!r}, which is not a file in {src}; the "
                        "checkpoint is incomplete")
    meta = data.get("metadata")
    return _Source(index.name.removesuffix(".safetensors.index.json"),
                   tuple(src / n for n in sorted(names)), index, weight_map,
                   dict(meta) if isinstance(meta, dict) else {})


def _read_tensors(source: _Source) -> tuple[dict[str, _Tensor], dict]:
    """Every tensor of the checkpoint, and the first shard's ``__metadata__`` (for the output)."""
    tensors: dict[str, _Tensor] = {}
    metadata = None
    for path in source.files:
        found, meta = _read_header(path)
        metadata = meta if metadata is None else metadata
        for name, tensor in found.items():
            if name in tensors:
                raise LoadError(f"{name} is stored twice, in {tensors[name].file.name} and "
                                f"{path.name}; the checkpoint is inconsistent")
            tensors[name] = tensor
    for name, file in source.weight_map.items():
        if name not in tensors or tensors[name].file.name != file:
            raise LoadError(f"{source.index.name} puts {name} in {file}, which does not hold "
                            "it; the index does not match the shards")
    return tensors, metadata or {"format": "pt"}


def _read_header(path: Path) -> tuple[dict[str, _Tensor], dict | None]:
    """The tensors of one shard, checked as the format specifies, and its ``__metadata__``."""
    def damaged(why: str) -> LoadError:
        return LoadError(f"{path} is not a valid safetensors file ({why}); it may be truncated "
                         "or corrupted: download or write it again")

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise damaged("bad header length")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:
        raise damaged(f"header is not JSON: {brief(exc, 60)}") from exc
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise damaged("__metadata__ is not a map of strings")
    base, tensors = 8 + n, {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in [*shape, start, end])
                  and start <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise damaged(f"bad entry for {name}")
        if dtype in DTYPE_BYTES and end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise damaged(f"{name} has {end - start} bytes for shape {shape} of {dtype}")
        tensors[name] = _Tensor(path, dtype, tuple(shape), base + start, base + end)
    position = base
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != position:
            raise damaged("tensor data overlap or leave gaps")
        position = t.end
    if position != size:
        raise damaged(f"the data is {size - base} bytes but the header describes "
                      f"{position - base}")
    return tensors, meta


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise LoadError(f"{path} is not valid JSON ({brief(exc, 80)}); fix or replace it") from exc


def _read_config(src: Path) -> dict | None:
    path = src / "config.json"
    if not path.is_file():
        return None
    data = _load_json(path)
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a JSON object; fix or replace it")
    return data


# -- deciding: the stack, the insertions, the zeroed tensors ------------------------------------

def _layer_counts(settings: dict | None) -> set[int]:
    return {d[k] for d, _ in _dicts(settings or {}) for k in LAYER_COUNT_KEYS
            if type(d.get(k)) is int}


def _dicts(data: dict, path: str = ""):
    """``data`` and the dicts nested in it (``text_config``), each with its dotted path."""
    yield data, path
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _dicts(value, f"{path}{key}.")


def _split_name(name: str, prefix: str) -> tuple[int, str] | None:
    """(layer index, rest) when ``name`` is ``<prefix>.<index>.<rest>``."""
    if not name.startswith(prefix + "."):
        return None
    index, _, rest = name[len(prefix) + 1:].partition(".")
    if rest and index.isascii() and index.isdigit() and str(int(index)) == index:
        return int(index), rest
    return None


def _find_stack(tensors: dict[str, object], prefix: str | None,
                counts: set[int]) -> tuple[str, list[dict[str, str]]]:
    """The layer prefix and, per layer, ``{rest: full name}``."""
    if prefix is not None:
        prefix = prefix.rstrip(".")
    else:
        stacks: dict[str, set[int]] = {}
        for name in tensors:
            parts = name.split(".")
            # the outermost stack: the name part before the first index (not an expert's index)
            k = next((k for k, p in enumerate(parts[1:-1], 1) if p.isascii() and p.isdigit()),
                     None)
            if k is not None:
                stacks.setdefault(".".join(parts[:k]), set()).add(int(parts[k]))
        stacks = {p: s for p, s in stacks.items() if s == set(range(len(s)))}
        if not stacks:
            raise ConfigError("found no layer stack (names like model.layers.<i>.<rest>) in the "
                              "checkpoint; pass prefix='...'")
        agreeing = {p: s for p, s in stacks.items() if len(s) in counts}
        stacks = agreeing or stacks
        most = max(len(s) for s in stacks.values())
        best = sorted(p for p, s in stacks.items() if len(s) == most)
        if len(best) > 1:
            raise ConfigError(f"several layer stacks have {most} layers ({', '.join(best)}); "
                              f"pass prefix='{best[0]}' or another")
        prefix = best[0]
    layers: dict[int, dict[str, str]] = {}
    for name in tensors:
        split = _split_name(name, prefix)
        if split is not None:
            layers.setdefault(split[0], {})[split[1]] = name
    if not layers:
        raise ConfigError(f"no tensor is named {prefix}.<i>.<rest>; pass a prefix the "
                          "checkpoint uses")
    if set(layers) != set(range(len(layers))):
        missing = min(set(range(max(layers) + 1)) - set(layers))
        raise ConfigError(f"the stack {prefix} has no layer {missing}; its layers must be "
                          f"numbered 0..{max(layers)}")
    return prefix, [layers[i] for i in range(len(layers))]


def _check_pre_norm(settings: dict | None, prefix: str, layers: list[dict[str, str]]) -> None:
    why = None
    for d, path in _dicts(settings or {}):
        if d.get("model_type") in POST_NORM_MODEL_TYPES:
            why = f"config.json's {path}model_type is {d['model_type']!r}"
        flag = next((k for k, v in POST_NORM_FLAGS.items() if d.get(k) is v), None)
        if flag:
            why = f"config.json sets {path}{flag}={str(POST_NORM_FLAGS[flag]).lower()}"
    modules = {rest.rpartition(".")[0] for rest in layers[0]}
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        if leaf.lower() in NORM_NAMES and _join(parent, "dense") in modules:
            why = (f"{prefix}.0.{module} normalises after the residual add of "
                   f"{_join(parent, 'dense')}")
    if why:
        raise ConfigError(f"block expansion needs pre-norm residual blocks, x + f(norm(x)), and "
                          f"these are post-norm ({why}): a zeroed branch would leave norm(x), "
                          "not x")


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _insertions(n: int, insert_after, every, blocks) -> list[tuple[int, bool]]:
    """The expanded stack: per new index, (original block it copies, whether it is new)."""
    if blocks is not None:
        if blocks > n:
            raise ConfigError(f"blocks={blocks} is more than the {n} layers; use insert_after "
                              "to add several blocks after one")
        after = spread(n, blocks)
    elif every is not None:
        after = list(range(every - 1, n, every))
        if not after:
            raise ConfigError(f"every={every} is more than the {n} layers; nothing to insert")
    else:
        bad = [i for i in insert_after if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < n]
        if bad:
            raise ConfigError(f"insert_after holds {bad[0]!r}; block indices run from 0 to "
                              f"{n - 1}")
        after = insert_after
    out = []
    for i in range(n):
        out.append((i, False))
        out.extend((i, True) for _ in range(after.count(i)))
    return out


def _choose_zeros(dtypes: dict[str, str], prefix: str, layers: list[dict[str, str]],
                  sources: list[tuple[int, bool]], zero) -> dict[int, tuple[str, frozenset[str]]]:
    """Per copied layer: the rule and the tensors (relative to the layer) its copies zero."""
    chosen = {src: _zeroed({rest: dtypes[name] for rest, name in layers[src].items()}, zero,
                           f"{prefix}.{src}")
              for src in sorted({s for s, is_new in sources if is_new})}
    if zero != "auto":
        unused = [z for z in zero if not any(_match(rest, z) for src in chosen
                                             for rest in layers[src])]
        if unused:
            raise ConfigError(f"zero={zero!r}: {unused[0]!r} matches no tensor of the copied "
                              "blocks; give names relative to a block, e.g. 'mlp.down_proj'")
    return {src: (rule, frozenset(names)) for src, (rule, names) in chosen.items()}


def _plan_tensors(tensors: dict[str, _Tensor], plan: StackPlan) -> list[_Out]:
    """Every output tensor in order (natural sort of the new names)."""
    in_stack = {name for block in plan.layers for name in block.values()}
    outputs = [_Out(name, t) for name, t in tensors.items() if name not in in_stack]
    for new_index, (src, is_new) in enumerate(plan.sources):
        zeroed = plan.zeroed[src][1] if is_new else frozenset()
        for rest, name in plan.layers[src].items():
            outputs.append(_Out(f"{plan.prefix}.{new_index}.{rest}", tensors[name],
                                rest in zeroed))
    return sorted(outputs, key=lambda t: _natural(t.name))


def _zeroed(block: dict[str, str], zero, where: str) -> tuple[str, set[str]]:
    """(the rule used, the names relative to the block of the tensors to zero in its copy)."""
    if zero != "auto":
        rule, targets = "zero=[...]", _targets(block, zero)
        if not targets:
            raise ConfigError(f"zero={zero!r} matches no tensor of block {where}; its tensors: "
                              f"{', '.join(sorted(block))}")
    else:
        fits = {family: _targets(block, paths) for family, paths in ZERO_RULES.items()
                if all(_targets(block, [p]) for p in paths)}
        widest = [f for f in fits if all(fits[f].keys() >= other.keys()
                                         for other in fits.values())]
        if not widest:
            what = ("no rule in ZERO_RULES fits" if not fits else
                    f"the rules {', '.join(sorted(fits))} disagree")
            raise ConfigError(f"{what} for block {where} ({', '.join(sorted(block))}); pass "
                              "zero=[...] with the modules that end all its residual branches, "
                              "e.g. zero=['self_attn.o_proj', 'mlp.down_proj']")
        rule, targets = widest[0], fits[widest[0]]
    left = sorted(rest for rest in block
                  if _module_leaf(rest) in BRANCH_END_NAMES and rest not in targets)
    if left:
        given = f"rule {rule!r}" if zero == "auto" else f"zero={zero!r}"
        raise ConfigError(f"{given} leaves {left[0]} in block {where}, and such a module ends a "
                          "residual branch: the copy would not be the identity; pass zero=[...] "
                          "with the modules that end all its branches")
    for rest, kind in sorted(targets.items()):
        module, _, leaf = rest.rpartition(".")
        if block[rest] not in DTYPE_BYTES or (kind == "module"
                                              and leaf not in ("weight", "bias")):
            raise ConfigError(f"cannot zero {where}.{rest} ({block[rest]}): only float or "
                              "integer weights and biases become exactly zero, not quantized "
                              "or packed tensors; dequantize the checkpoint first")
        bias = _join(module, "bias")
        if leaf == "weight" and bias in block and bias not in targets:
            raise ConfigError(f"zeroing {where}.{rest} but not {where}.{bias} leaves the bias "
                              f"in the branch; name the module: zero=[{module!r}, ...]")
    return rule, set(targets)


def _targets(block: dict[str, str], patterns) -> dict[str, str]:
    """The block's tensors that some pattern matches, each with how (see ``_match``)."""
    found = {}
    for rest in block:
        kinds = {_match(rest, p) for p in patterns} - {None}
        if kinds:
            found[rest] = "tensor" if "tensor" in kinds else "module"
    return found


def _module_leaf(rest: str) -> str:
    """The last name of the module that holds a tensor: "o_proj" for "self_attn.o_proj.weight"."""
    return rest.rpartition(".")[0].rpartition(".")[2]


def _match(rest: str, pattern: str) -> str | None:
    """How a block's tensor ``rest`` matches ``pattern``: as the "tensor" itself, or as a
    parameter of the "module" it names (the pattern is a tail of the name; ``*`` any one part)."""
    parts, wanted = rest.split("."), pattern.split(".")
    for kind, tail in (("tensor", parts), ("module", parts[:-1])):
        if len(tail) >= len(wanted) and all(map(fnmatch.fnmatchcase, tail[-len(wanted):],
                                                   wanted)):
            return kind
    return None


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def _expand_config(settings: dict, n: int, sources: list[tuple[int, bool]]) -> tuple[dict, list]:
    """A deep copy of config.json for the new depth, and the dotted keys it changed."""
    new = json.loads(json.dumps(settings))
    holders = [(d, path) for d, path in _dicts(new)
               if any(d.get(k) == n and type(d.get(k)) is int for k in LAYER_COUNT_KEYS)]
    if not holders:
        counts = sorted(_layer_counts(new))
        if counts:
            raise ConfigError(f"config.json gives {counts[0]} layers but the checkpoint has {n}; "
                              "pass the right prefix, or config=False to copy it unchanged")
        return new, []
    if len(holders) > 1:
        raise ConfigError(f"config.json gives {n} layers in both {holders[0][1] or 'top level'} "
                          f"and {holders[1][1] or 'top level'}; pass config=False and edit it")
    d, path = holders[0]
    _check_schedules(d, path, sources)
    renumber = {}
    for new_index, (src, _) in enumerate(sources):
        renumber.setdefault(src, []).append(new_index)
    changed = []
    for key, value in list(d.items()):
        if key in LAYER_COUNT_KEYS and value == n:
            d[key] = len(sources)
        elif key in INDEX_LIST_KEYS and isinstance(value, list):
            if not all(type(i) is int and 0 <= i < n for i in value):
                raise ConfigError(f"config.json's {path}{key} holds something other than layer "
                                  f"indices 0..{n - 1}; fix it or pass config=False")
            d[key] = sorted(j for i in value for j in renumber[i])
        elif isinstance(value, list) and len(value) == n and key not in NOT_PER_LAYER_KEYS:
            d[key] = [value[src] for src, _ in sources]
        else:
            continue
        if d[key] != value:
            changed.append(path + key)
    return new, changed


def _check_schedules(d: dict, path: str, sources: list[tuple[int, bool]]) -> None:
    """Refuse a config whose rule by index would give existing layers another kind."""
    first_copied = min(src for src, is_new in sources if is_new)
    for key, rule in SCHEDULES.items():
        value = d.get(key)
        if value is None or value == rule.neutral or (rule.switch and not d.get(rule.switch)) \
                or isinstance(d.get(rule.listed_by), list):
            continue
        if rule.first_k and type(value) is int and first_copied >= value:
            continue
        fix = (f"insert after layers {value} and later only" if rule.first_k else
               f"add {rule.listed_by} to config.json first" if rule.listed_by else
               "block expansion cannot keep this (config=False copies config.json as is, for "
               "model code you adapt)")
        raise ConfigError(f"config.json sets {path}{key}={value}: layers get their kind by "
                          f"index, and new layers would shift the kind of later ones; {fix}")


# -- writing --------------------------------------------------------------------------------------

def _split_shards(outputs: list[_Out], cap: int, base: str) -> list[tuple[str, list[_Out]]]:
    """Consecutive groups of at most ``cap`` bytes (a larger tensor alone), named as HF does."""
    groups: list[list[_Out]] = [[]]
    size = 0
    for t in outputs:
        if groups[-1] and size + t.source.nbytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.source.nbytes
    if len(groups) == 1:
        return [(f"{base}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{base}-{i:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def _write_shards(folder: Path, shards, metadata: dict) -> int:
    buffer, zeros = memoryview(bytearray(CHUNK_BYTES)), memoryview(bytes(CHUNK_BYTES))
    handles: dict[Path, object] = {}
    written = 0
    try:
        for name, group in shards:
            # widest elements first, and a header padded to 8 bytes: every tensor is aligned
            group = sorted(group, key=lambda t: -DTYPE_BYTES.get(t.source.dtype, 1))
            header, offset = {"__metadata__": metadata}, 0
            for t in group:
                header[t.name] = {"dtype": t.source.dtype, "shape": list(t.source.shape),
                                  "data_offsets": [offset, offset + t.source.nbytes]}
                offset += t.source.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with (folder / name).open("wb") as out:
                out.write(len(raw).to_bytes(8, "little"))
                out.write(raw)
                for t in group:
                    if t.zero:
                        _write_zeros(out, t.source.nbytes, zeros)
                    else:
                        f = handles.get(t.source.file)
                        if f is None:
                            f = handles[t.source.file] = t.source.file.open("rb", buffering=0)
                        _copy(f, t.source, out, buffer)
                out.flush()
                os.fsync(out.fileno())
            written += 8 + len(raw) + offset
    finally:
        for f in handles.values():
            f.close()
    return written


def _copy(f, t: _Tensor, out, buffer: memoryview) -> None:
    f.seek(t.start)
    left = t.nbytes
    while left:
        got = f.readinto(buffer[:min(left, len(buffer))])
        if not got:
            raise LoadError(f"{t.file} ended early; it was truncated while being read")
        out.write(buffer[:got])
        left -= got


def _write_zeros(out, n: int, zeros: memoryview) -> None:
    while n:
        k = min(n, len(zeros))
        out.write(zeros[:k])
        n -= k


def _write_index(path: Path, shards, metadata: dict) -> int:
    total = sum(t.source.nbytes for _, group in shards for t in group)
    metadata = {**metadata, "total_size": total}
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(t.source.shape)
                                           for _, group in shards for t in group)
    weight_map = {t.name: name for name, group in shards for t in group}
    return _write_json(path, {"metadata": metadata,
                              "weight_map": dict(sorted(weight_map.items()))})


def _write_json(path: Path, data: dict) -> int:
    text = json.dumps(data, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode())


def _other_files(src: Path, source: _Source, *,
                 rewrite_config: bool) -> tuple[list[Path], list[str]]:
    """Files copied unchanged (tokenizer, generation config), and those left out, by name."""
    copied, skipped = [], []
    ours = {*source.files, source.index} | ({src / "config.json"} if rewrite_config else set())
    for path in sorted(src.iterdir()):
        if path in ours:
            continue
        if not path.is_file():
            skipped.append(path.name + "/")
        elif path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(path.name)   # other weights (pytorch_model.bin) have the old depth
        else:
            copied.append(path)
    return copied, skipped


def _publish(scratch: Path, dst: Path) -> None:
    """Move the finished folder into place: one rename, or one per file into an empty ``dst``."""
    try:
        if not dst.exists():
            os.rename(scratch, dst)
            return
        for path in scratch.iterdir():
            os.replace(path, dst / path.name)
    except OSError as exc:
        raise ExportError(f"cannot move the expanded checkpoint into {dst}: {exc.strerror}; "
                          "give a new folder") from exc
