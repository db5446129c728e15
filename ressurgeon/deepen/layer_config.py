"""config.json for a deeper stack: the layer count, per-layer lists and index lists follow.

A block expansion that adds layers must rewrite config.json so that the model code
builds the new depth: the layer count grows, each per-layer list (``layer_types``)
gets each new layer's source entry, and index lists (``mlp_only_layers``) are
renumbered. A config that gives layers their kind by a rule over indices
(``SCHEDULES``) is refused unless the rule stays true for every existing layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["LAYER_COUNT_KEYS", "SCHEDULES", "Schedule", "config_for"]

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


def config_for(settings: dict, n: int, sources: list[tuple[int, bool]]) -> tuple[dict, list[str]]:
    """config.json (a copy) for the stack ``sources`` describes over ``n`` original layers, and
    the dotted keys that changed; ``sources`` as in ``StackPlan``.

    Raises:
        ConfigError: as ``plan_stack``, when the config cannot follow the new depth.
    """
    if not any(is_new for _, is_new in sources):
        return json.loads(json.dumps(settings)), []
    return _expand_config(settings, n, sources)


def _layer_counts(settings: dict | None) -> set[int]:
    return {d[k] for d, _ in _dicts(settings or {}) for k in LAYER_COUNT_KEYS
            if type(d.get(k)) is int}


def _dicts(data: dict, path: str = ""):
    """``data`` and the dicts nested in it (``text_config``), each with its dotted path."""
    yield data, path
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _dicts(value, f"{path}{key}.")


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
