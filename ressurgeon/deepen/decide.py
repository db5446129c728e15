"""Deciding a block expansion from tensor names alone: the stack, the copies, the zeroed tensors.

``plan_stack`` is the one decision that ``expand_checkpoint`` (on disk, streaming)
and ``ressurgeon.deepen`` (a Hugging Face model in memory) both execute: which
names form the layer stack, where the new blocks go (``spread``), and which
tensors of each copy are set to zero so the copy is exactly the identity
(``ZERO_RULES``). Nothing is read or written here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..errors import ConfigError
from ..load.safetensors import DTYPE_BYTES
from .layer_config import _dicts, _expand_config, _layer_counts

__all__ = ["BRANCH_END_NAMES", "ZERO_RULES", "StackPlan", "find_layer_stack", "plan_stack",
           "spread"]

# Zeroing writes all-zero bytes, which are the number 0 in each dtype of DTYPE_BYTES; other
# dtypes (F8_E8M0, F4, ...) are copied but never zeroed: zero bytes may not mean 0 there.

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
