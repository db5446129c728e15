"""rewire, analysis: the model's block list, and the pre-norm layout of its blocks.

The block list is found as ``deepen`` finds a transformer's layer stack (``find_layer_stack``:
parameter names ``<prefix>.<i>.…`` and, for a transformers model, the config's layer count),
for a transformers model and for a plain ``nn.Module`` alike; it must be a ``ModuleList`` or
``Sequential`` that the model's forward runs item by item.

Hyper-connections replace a block's own residual adds, so they need the block's sublayers:
``FORMS`` lists the pre-norm layouts ressurgeon knows (``x = x + f(norm(x))`` per sublayer),
each as the attribute names of its (norm, sublayer) pairs, read from the installed
transformers' ``forward`` of each family. A block of another layout is refused with the reason
(a post-norm block, ``norm(x + f(x))``, has no stream update ``h + 1*y`` to take over).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn

from ..deepen.stream import find_layer_stack
from ..errors import ConfigError
from ..load.hf import is_pretrained


@dataclass
class BlockStack:
    """The block list of a model: ``prefix`` names it (``model.layers``), ``blocks`` its items."""

    prefix: str
    container: nn.Module
    hf: bool

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.container)

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}.{i}" for i in range(len(self.container))]


def find_blocks(model: nn.Module) -> BlockStack:
    """The model's block list.

    Raises:
        ConfigError: no repeated block list, several equally likely ones, or one that is not
            a ModuleList / Sequential.
    """
    names = {name: str(t.dtype) for name, t in model.state_dict().items()}
    settings = model.config.to_dict() if is_pretrained(model) else None
    try:
        prefix, _ = find_layer_stack(names, settings)
    except ConfigError as exc:
        raise ConfigError(f"found no block list in {type(model).__name__}; rewire needs "
                          "a ModuleList or Sequential of repeated blocks (parameters named like "
                          "blocks.<i>.<rest>) that the forward runs in order; a .pt2 archive "
                          "holds one flat graph: load the model from its class (--arch)") from exc
    container = model.get_submodule(prefix)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(f"{prefix} is a {type(container).__name__}, not a ModuleList or "
                          "Sequential; rewire wraps the items of a block list that the model's "
                          "forward runs one after the other (a .pt2 archive holds one flat "
                          "graph: load the model from its class, with --arch, instead)")
    if len(container) < 2:
        raise ConfigError(f"{prefix} holds {len(container)} block; rewiring needs at least two")
    return BlockStack(prefix=prefix, container=container, hf=is_pretrained(model))


@dataclass(frozen=True)
class PreNormForm:
    """A pre-norm block layout: ``x = x + sublayer(norm(x))`` for each (norm, sublayer) pair.

    ``attention`` is the sublayer that takes the block's other arguments (mask, positions,
    cache), which the block's forward passes on to it, less ``dropped``; ``unsupported``
    arguments must be None (GPT-2's cross-attention inputs). ``returns_tuple``: the attention
    returns (output, weights). ``scales``: optional per-sublayer modules applied to the
    sublayer's output, in order (timm's LayerScale ``ls1`` and DropPath ``drop_path1``).
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    attention: str
    returns_tuple: bool
    takes_arguments: bool = True
    dropped: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()             # attributes whose presence rules the form out
    scales: tuple[tuple[str, ...], ...] = ()

    def matches_pairs(self, block: nn.Module) -> bool:
        return all(isinstance(getattr(block, a, None), nn.Module)
                   for pair in self.pairs for a in pair)

    def matches(self, block: nn.Module) -> bool:
        return self.matches_pairs(block) and not any(hasattr(block, a) for a in self.absent)


FORMS: tuple[PreNormForm, ...] = (
    # LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer (transformers 5)
    PreNormForm("llama", (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")),
                attention="self_attn", returns_tuple=True),
    # GPT2Block without cross-attention
    PreNormForm("gpt2", (("ln_1", "attn"), ("ln_2", "mlp")), attention="attn",
                returns_tuple=True, dropped=("encoder_hidden_states", "encoder_attention_mask"),
                unsupported=("encoder_hidden_states", "encoder_attention_mask"),
                absent=("crossattention",)),
    # timm's ViT Block and hand-written pre-norm blocks: x + attn(norm1(x)); x + mlp(norm2(x))
    PreNormForm("timm", (("norm1", "attn"), ("norm2", "mlp")), attention="attn",
                returns_tuple=False, takes_arguments=False,
                scales=(("ls1", "drop_path1"), ("ls2", "drop_path2"))),
)


def form_of(block: nn.Module) -> PreNormForm:
    """The pre-norm layout of ``block``.

    Raises:
        ConfigError: the block is post-norm, or of a layout none of ``FORMS`` describes.
    """
    for form in FORMS:
        if form.matches(block):
            return form
    name = type(block).__name__
    for form in FORMS:
        extra = [a for a in form.absent if hasattr(block, a)]
        if extra and form.matches_pairs(block):
            raise ConfigError(f"{name} has {extra[0]} (a {form.name} block with "
                              "cross-attention), which hyper-connections do not rewire; use "
                              "kind='dwa'")
    if _post_norm(block):
        raise ConfigError(f"{name} is post-norm (its norm follows the residual add, "
                          "norm(x + f(x))), so there is no stream update h + 1*y inside it "
                          "for hyper-connections to take over; use kind='dwa', which only "
                          "mixes block outputs and is exact for post-norm blocks too")
    known = "; ".join(f"{f.name}: " + ", ".join(a for p in f.pairs for a in p) for f in FORMS)
    raise ConfigError(f"{name} is not a pre-norm block layout ressurgeon knows ({known}); "
                      "hyper-connections replace the block's residual adds, so they need its "
                      "sublayers; use kind='dwa', which treats blocks as black boxes")


def _post_norm(block: nn.Module) -> bool:
    """BERT-like layers: the output sublayer ends in a LayerNorm applied after the add."""
    output = getattr(block, "output", None)
    return isinstance(getattr(output, "LayerNorm", None), nn.Module) or \
        type(block).__name__.startswith(("Bert", "Roberta", "Electra", "Albert"))


def describe_blocks(model: nn.Module) -> list[dict]:
    """The block list as ``rewire`` sees it, one entry per block: its name, class, parameter
    count, and the pre-norm form hyper-connections would use (or why they cannot).

    Raises:
        ConfigError: no block list (as ``find_blocks``).
    """
    stack = find_blocks(model)
    rows = []
    for name, block in zip(stack.names, stack.blocks):
        inner = getattr(block, "block", block) if hasattr(block, "_state") else block
        try:
            form, reason = form_of(inner).name, None
        except ConfigError as exc:
            form, reason = None, str(exc)
        rows.append({"name": name, "class": type(inner).__name__,
                     "params": sum(p.numel() for p in inner.parameters()),
                     "dwa": True, "hyper_form": form, "hyper_refused": reason})
    return rows


def bind_arguments(block: nn.Module, hidden, args: tuple, kwargs: dict) -> dict:
    """The arguments the block's forward received besides the stream, by name (``**kwargs``
    flattened), as the block would pass them on to its attention."""
    signature = inspect.signature(block.forward)
    bound = signature.bind(hidden, *args, **kwargs)
    params = list(signature.parameters.values())
    out: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if name == params[0].name:
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(block).__name__} got extra positional arguments; "
                                "rewire cannot pass them to its sublayers by name")
        else:
            out[name] = value
    return out
