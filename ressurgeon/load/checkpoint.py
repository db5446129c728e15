"""Training checkpoints: the state_dict inside the dict a training script saved.

``torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": ...})`` (the
PyTorch tutorial), timm's train.py (``state_dict``, ``state_dict_ema``, ``args``),
Lightning (``state_dict`` with a ``model.`` prefix, ``hyper_parameters``, loops and
callbacks state) and DDP (``module.`` prefixes) all hold the weights one level down.
``find_state_dict`` picks them: ``key`` when given, else the one dict of tensors among the
values, else the first of ``USUAL_KEYS`` present; ``match_prefix`` strips a prefix that all
keys share when the keys then match the architecture exactly.

Still no code from the file runs. The file is read by torch's weights_only unpickler; the
few non-tensor containers training scripts save beside the weights are read as inert
stand-ins (``inert_globals``), in the manner of ``_nn_pickle``: a stand-in can be rebuilt
from its state and never called, and holds nothing but that state. ``argparse.Namespace``
(timm's ``args``) becomes an ``InertObject``; Lightning's ``AttributeDict``
(``hyper_parameters``) a plain dict. No other class is admitted.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .nn_pickle import _RebuildOnly   # calling a stand-in (pickle's REDUCE) is refused
from ..errors import LoadError

#: where checkpoints keep the model's weights, most specific first; the EMA copy
#: (timm's ``state_dict_ema``) only when nothing else is there, or by ``--key``
USUAL_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network",
              "state_dict_ema", "model_ema")

#: global names training scripts pickle beside the weights, read as inert data
_NAMESPACES = ("argparse.Namespace",)
_ATTRIBUTE_DICTS = ("lightning.fabric.utilities.data.AttributeDict",
                    "lightning.pytorch.utilities.parsing.AttributeDict",
                    "pytorch_lightning.utilities.parsing.AttributeDict")


class CheckpointNote(UserWarning):
    """Which entry of a checkpoint and which prefix ``load_model`` used (the CLI prints it)."""


class InertObject:
    """What an ``argparse.Namespace`` in a checkpoint becomes: its attributes, nothing to call."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"InertObject({fields})"


def _stand_in(name: str, make) -> type:
    def __new__(cls, *args):
        if args:
            raise pickle.UnpicklingError(f"{name} is rebuilt without arguments")
        return make()

    module, _, qualname = name.rpartition(".")
    return _RebuildOnly(qualname, (), {"__new__": __new__, "__module__": module,
                                       "__qualname__": qualname})


def inert_globals() -> list[tuple[object, str]]:
    """(stand-in, global name) pairs for ``torch.serialization.safe_globals``.

    ``InertObject`` itself is registered under a name no pickle can spell (it contains a
    newline) only so that the unpickler's BUILD accepts its instances.
    """
    entries: list[tuple[object, str]] = [
        (_stand_in(n, lambda: object.__new__(InertObject)), n) for n in _NAMESPACES]
    entries += [(_stand_in(n, dict), n) for n in _ATTRIBUTE_DICTS]
    entries.append((InertObject, f"{__name__}\nInertObject"))
    return entries


def inert_names() -> frozenset[str]:
    return frozenset(_NAMESPACES + _ATTRIBUTE_DICTS)


def _tensor_dict(value: object) -> dict | None:
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor)
                                                 for v in value.values()):
        return value
    return None


@dataclass(frozen=True)
class Found:
    """The weights a checkpoint holds, and where they were (``key`` None: the file itself)."""

    state: dict
    key: str | None
    others: tuple[str, ...] = ()   # other tensor dicts it holds (``--key`` picks one)


def find_state_dict(obj: object, key: str | None = None, *, path=None) -> Found | None:
    """The state_dict in ``obj``: itself, ``obj[key]``, its one tensor dict, or a usual key.

    Returns None when ``obj`` holds no tensor dict at all (not a checkpoint).

    Raises:
        LoadError: ``key`` is not there or holds no tensors, or several tensor dicts
            and none of ``USUAL_KEYS`` (the message lists them and says ``--key``).
    """
    where = path if path is not None else "the checkpoint"
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = ", ".join(map(repr, obj)) if isinstance(obj, dict) else "none"
            raise LoadError(f"--key {key}: {where} has no entry {key!r} (its keys: {keys})")
        state = _tensor_dict(obj[key])
        if state is None:
            raise LoadError(f"--key {key}: {where}[{key!r}] is a {type(obj[key]).__name__}, "
                            "not a state_dict (a dict of tensors)")
        return Found(state, key)
    state = _tensor_dict(obj)
    if state is not None:
        return Found(state, None)
    if not isinstance(obj, dict):
        return None
    found = {k: s for k, v in obj.items() if isinstance(k, str)
             and (s := _tensor_dict(v)) is not None}
    if not found:
        return None
    if len(found) == 1:
        (name, state), = found.items()
        return Found(state, name)
    usual = next((k for k in USUAL_KEYS if k in found), None)
    if usual is None:
        raise LoadError(f"{where} holds several state_dicts ({', '.join(map(repr, found))}); "
                        "name the one to load with --key")
    return Found(found[usual], usual, tuple(k for k in found if k != usual))


def match_prefix(state: dict, wanted: set[str]) -> tuple[dict, str]:
    """``state`` with a prefix all its keys share removed when the rest matches ``wanted`` exactly.

    Lightning saves ``model.``-prefixed keys, DDP ``module.``, both together
    ``model.module.``: each leading component shared by every key is tried, shortest
    first. Returns (the state, the prefix removed, "" for none).
    """
    if set(state) == wanted:
        return state, ""
    prefix = ""
    keys = list(state)
    while True:
        heads = {k[len(prefix):].partition(".")[0] for k in keys}
        if len(heads) != 1 or not all("." in k[len(prefix):] for k in keys):
            return state, ""
        prefix += heads.pop() + "."
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) == wanted:
            return stripped, prefix


def note(found: Found | None, prefix: str, path) -> None:
    """Say which entry and prefix were used (a ``CheckpointNote``), when either applies."""
    if (found is None or found.key is None) and not prefix:
        return
    parts = []
    if found is not None and found.key is not None:
        parts.append(f"the state_dict under key {found.key!r}")
    if prefix:
        parts.append(f"prefix {prefix!r} stripped from its keys")
    text = f"{path}: loaded " + ", ".join(parts)
    if found is not None and found.others:
        text += f" (also holds {', '.join(map(repr, found.others))}: --key picks one)"
    warnings.warn(CheckpointNote(text), stacklevel=3)
