"""One submodule of a model, captured on its own and spliced back (``SkipConfig.module``).

A model that torch.fx cannot trace as a whole (data-dependent Python in its
forward, a detection model's variable-length loops) often holds a backbone
that traces. ``submodule_inputs`` runs the whole model once on the example
inputs and records what that submodule receives; a pass then rewrites the
submodule alone, and ``splice`` puts the result into a deep copy of the model,
which keeps its class, its methods, its other submodules and every
state_dict key outside the rewritten part.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._torch import quiet_copy
from ..errors import ConfigError

__all__ = ["submodule_inputs", "splice"]


def submodule_inputs(model: nn.Module, path: str, inputs: tuple) -> tuple[nn.Module, tuple]:
    """The submodule at ``path`` and the tensors it is called with when ``model`` runs ``inputs``.

    The model runs once, in its own mode, without gradients.

    Raises:
        ConfigError: no submodule at ``path`` (the error lists the model's
            children), it is not called exactly once, or it is called with
            keyword or non-tensor arguments.
    """
    try:
        sub = model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise ConfigError(f"module: {type(model).__name__} has no submodule '{path}' (its "
                          f"children: {children})") from None
    if sub is model:
        raise ConfigError("module: name a submodule (e.g. 'backbone'), not the model itself")
    calls: list[tuple[tuple, dict]] = []

    def record(_module, args, kwargs):
        calls.append((args, kwargs))

    handle = sub.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
    if len(calls) != 1:
        raise ConfigError(f"module: '{path}' is called {len(calls)} times in one forward; "
                          "name a submodule the model calls once")
    args, kwargs = calls[0]
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError(f"module: '{path}' is called with keyword or non-tensor arguments; "
                          "name a submodule called with tensors only")
    return sub, tuple(a.detach().clone() for a in args)


def splice(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with ``new`` at ``path`` (``model`` itself is not modified)."""
    whole = quiet_copy(model)
    parent, _, leaf = path.rpartition(".")
    owner = whole.get_submodule(parent) if parent else whole
    new.train(model.get_submodule(path).training)
    setattr(owner, leaf, new)
    return whole
