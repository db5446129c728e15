"""deepen, for a Hugging Face ``transformers`` model in memory: block expansion in its layer list.

The decision is the on-disk one (``stream.plan_stack``: the layer stack found from parameter
names and config, ``ZERO_RULES`` for what to zero, the new config); here it is executed on
the model object: copies of the chosen layers go into its ``ModuleList``, their output
projections zeroed, every module's ``layer_idx`` (the key of the attention cache) renumbered,
and the config's layer count and per-layer entries updated. The result is still the model's
own class: ``save_pretrained`` and ``generate`` work as before, and ``AutoModel`` loads what
``save_pretrained`` writes.

transformers itself is never imported here: a model is recognised by the class it already is
(``ressurgeon.hf.is_pretrained``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..load.hf import is_pretrained
from ..config import DeepenConfig, How
from .decide import StackPlan, find_layer_stack, plan_stack
from .insert import NewBlock
from .layer_config import config_for
from .positions import Position

# safetensors dtype names, as the zero rules check them (zero bytes are the number 0)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _dtypes(model: nn.Module) -> dict[str, str]:
    return {name: _DTYPES.get(t.dtype, str(t.dtype)) for name, t in model.state_dict().items()}


def stack_positions(model: nn.Module, config: DeepenConfig) -> list[Position]:
    """Every layer of the model's layer stack, as a position for a copy of itself.

    Raises:
        ConfigError: ``how="new"`` (a transformers model grows by block expansion), or no
            layer stack is found.
    """
    if config.how is How.NEW:
        raise ConfigError("a transformers model grows by copies of its layers (how='copy' or "
                          "'auto'); new residual layers need a traced model")
    prefix, n = find_layer_stack(_dtypes(model), model.config.to_dict(), config.prefix)
    return [Position(name=f"{prefix}.{i}", how=How.COPY, module=f"{prefix}.{i}")
            for i in range(n)]


def expand_model(model: nn.Module, after: list[str], config: DeepenConfig
                 ) -> tuple[nn.Module, list[NewBlock], StackPlan]:
    """A deep copy of ``model`` with a zeroed copy of each named layer after it.

    Args:
        model: a transformers PreTrainedModel (not modified).
        after: layer names (``model.layers.3``), one per new block (repeat for two copies).
        config: for ``zero`` (names relative to a layer; default ``ZERO_RULES``).

    Returns:
        (the deeper model, its new blocks, the StackPlan it executes).

    Raises:
        ConfigError: as ``stream.plan_stack``: post-norm layers, no zero rule fits, a
            config that cannot follow the new depth.
    """
    prefix = after[0].rpartition(".")[0]
    indices = [int(name.rpartition(".")[2]) for name in after]
    plan = plan_stack(_dtypes(model), model.config.to_dict(), insert_after=indices,
                      prefix=prefix, zero=list(config.zero) or "auto")
    deeper = copy.deepcopy(model)
    layers = _restack(deeper, plan.prefix, plan.sources)
    blocks = []
    with torch.no_grad():
        for index, (src, is_new) in enumerate(plan.sources):
            if not is_new:
                continue
            names = tuple(f"{plan.prefix}.{index}.{rest}" for rest in sorted(plan.zeroed[src][1]))
            for name in names:
                _tensor(deeper, name).zero_()
            blocks.append(NewBlock(name=f"{plan.prefix}.{index}", how="copy",
                                   after=f"{plan.prefix}.{src}", zeroed=names,
                                   params=sum(p.numel() for p in layers[index].parameters()),
                                   shape=None))
    _apply_config(deeper.config, plan.config, plan.config_keys)
    return deeper, blocks, plan


def remove_layers(model: nn.Module, plan: StackPlan, settings: dict, drop: set[int]) -> nn.Module:
    """A deep copy of the deepened ``model`` without its layers at indices ``drop`` (new ones),
    the config and every ``layer_idx`` back in step (``DeepenResult.unfold``).

    Args:
        model: the deepened model (perhaps trained since).
        plan: the StackPlan that deepened it; ``settings``: the original config as a dict.
    """
    kept = [(i, src, is_new) for i, (src, is_new) in enumerate(plan.sources) if i not in drop]
    smaller = copy.deepcopy(model)
    _restack(smaller, plan.prefix, [(i, False) for i, _, _ in kept])
    new_config, _ = config_for(settings, len(plan.layers), [(s, n) for _, s, n in kept])
    _apply_config(smaller.config, new_config, plan.config_keys)
    return smaller


def _restack(model: nn.Module, prefix: str, sources) -> nn.ModuleList:
    """Replace the layer list at ``prefix`` by the one ``sources`` describes (copies of a layer
    after its first use are deep copies) and renumber every ``layer_idx`` in it."""
    stack = model.get_submodule(prefix)
    if not isinstance(stack, nn.ModuleList):
        raise ConfigError(f"{prefix} is a {type(stack).__name__}, not a ModuleList; only a layer "
                          "list can take new layers in memory (deepen the checkpoint folder "
                          "instead)")
    used: set[int] = set()
    layers = nn.ModuleList()
    for src, _ in sources:
        layers.append(copy.deepcopy(stack[src]) if src in used else stack[src])
        used.add(src)
    for index, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = index   # the key of this layer's entry in the attention cache
    owner, _, leaf = prefix.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, layers)
    return layers


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def _apply_config(config, data: dict | None, keys) -> None:
    """Set each dotted key of ``data`` on the config object (sub-configs are objects too)."""
    if data is None:
        return
    for key in keys:
        parts = key.split(".")
        target, value = config, data
        for part in parts[:-1]:
            target = target[part] if isinstance(target, dict) else getattr(target, part)
            value = value[part]
        if isinstance(target, dict):
            target[parts[-1]] = copy.deepcopy(value[parts[-1]])
        else:
            setattr(target, parts[-1], copy.deepcopy(value[parts[-1]]))
