"""What a reader knows about a model, as one record: the module, its example inputs, its kwargs.

Every reader of this package hands back a ``ModelRecord``; a model given to the
Python API (no file) gets the same record from ``record_of``. The later stages
read the record instead of asking a format what it knows:

- ``input_specs``: the example inputs the model was captured with (a
  torch.export archive records them), else a Hugging Face model's defaults from
  its config; empty when nothing says (then ``--input-shape`` must);
- ``forward_kwargs``: the keyword arguments that make the model compute what
  its capture computes (``use_cache=False`` for a transformers model), used to
  run the original beside the rewritten graph;
- ``vocab``: the range of integer inputs (token ids), from the input embedding;
- ``prepare``: what capture does to the copy it traces (a transformers model's
  configs get ``use_cache=False``); None: nothing.

``inputs.example_inputs`` builds seeded tensors from the specs; ``trace_model``
applies ``prepare`` to its copy; ``add_skips`` and ``rewire`` pass
``forward_kwargs`` to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn as nn
from torch import fx

from .hf import example_specs, forward_kwargs, is_pretrained, vocab_size, without_cache

__all__ = ["ModelRecord", "Spec", "record_of", "stored_inputs", "stored_shapes",
           "embedding_size"]

Spec = tuple[tuple[int, ...], "str | None"]   # (shape, dtype name such as "int64"; None: float)


@dataclass(frozen=True)
class ModelRecord:
    """One model as a reader (or ``record_of``) found it.

    Attributes:
        module: the model.
        input_specs: per example input, (shape, dtype name or None for floats);
            empty when neither the file nor the model says.
        forward_kwargs: keyword arguments the original is run with, so that it
            computes what its capture computes.
        vocab: integer inputs are drawn from ``[0, vocab)``; None when unknown.
        source: which reader made it ("pt2", "torchscript", "weights",
            "pickle", "hf", "safetensors") or "module" (handed in from Python).
        prepare: applied by capture to the copy it traces; None: nothing.

    Example:
        >>> record = record_of(torch.nn.Linear(4, 2))
        >>> record.input_specs, dict(record.forward_kwargs), record.source
        ((), {}, 'module')
    """

    module: nn.Module
    input_specs: tuple[Spec, ...] = ()
    forward_kwargs: Mapping[str, object] = field(default_factory=dict)
    vocab: int | None = None
    source: str = "module"
    prepare: Callable[[nn.Module], None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "forward_kwargs", MappingProxyType(dict(self.forward_kwargs)))


def record_of(model: nn.Module, source: str = "module") -> ModelRecord:
    """The record of a model in memory: what its graph recorded, or its transformers config.

    A GraphModule loaded from a ``.pt2`` keeps the shapes and dtypes of the
    inputs it was exported with; a transformers model has default inputs from
    its config and is captured without its KV cache. Anything else has no
    recorded inputs and no keyword arguments.
    """
    if isinstance(model, ModelRecord):
        return model
    # the transformers rules (hf.py) give nothing for any other model
    return ModelRecord(
        module=model,
        input_specs=tuple(stored_inputs(model) or example_specs(model)),
        forward_kwargs=forward_kwargs(model),
        vocab=vocab_size(model) or embedding_size(model),
        source=source,
        prepare=without_cache if is_pretrained(model) else None)


def stored_inputs(model: nn.Module) -> list[Spec]:
    """(shape, dtype name or None for floats) of each input a torch.export archive recorded."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    dtypes = [getattr(n.meta.get("val"), "dtype", None) for n in graph.nodes
              if n.op == "placeholder"]
    return [(shape, None if dt is None or dt.is_floating_point
             else str(dt).removeprefix("torch."))
            for shape, dt in zip(stored_shapes(model), dtypes)]


def stored_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Input shapes a torch.export archive recorded (symbolic sizes take their hint)."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):  # not a graph module (TorchScript has a graph too)
        return []
    shapes = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            return []
        dims = []
        for d in val.shape:
            try:
                dims.append(int(d))
            except Exception:
                hint = getattr(getattr(d, "node", None), "hint", None)
                dims.append(int(hint) if hint is not None else 1)
        shapes.append(tuple(dims))
    return shapes


def embedding_size(model: nn.Module) -> int | None:
    """The smallest number of embeddings of any nn.Embedding (or aten.embedding weight) in it."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            if node.target is torch.ops.aten.embedding.default and node.args \
                    and getattr(node.args[0], "op", None) == "get_attr":
                owner, _, leaf = str(node.args[0].target).rpartition(".")
                weight = getattr(model.get_submodule(owner) if owner else model, leaf)
                sizes.append(int(weight.shape[0]))
    return min(sizes) if sizes else None
