"""Let torch's weights_only unpickler rebuild modules made only of torch.nn's own classes.

``torch.save(model)`` of an ``nn.Sequential`` of Conv2d/BatchNorm/ReLU/Linear
(or LSTM, MultiheadAttention, Transformer layers) pickles references to those
classes, which ``torch.load(weights_only=True)`` refuses by default. Inside
``nn_safe_globals()`` it accepts them; the allowlist is enforced by torch's
restricted unpickler itself, opcode by opcode, not by a scan of ours.

Why rebuilding these classes runs nothing from the file. The weights_only
unpickler (torch/_weights_only_unpickler.py) does three things with an
allowlisted global:

- NEWOBJ: ``cls.__new__(cls, *args)``. For nn.Module classes that is
  ``object.__new__``: an empty instance, no ``__init__``.
- BUILD: ``inst.__setstate__(state)`` (nn.Module's updates ``__dict__`` and
  fills in defaults; Conv, RNN, MultiheadAttention and Transformer layers add
  defaults for old checkpoints) or a plain ``__dict__`` update. The state is
  itself unpickled by the same restricted unpickler: tensors, numbers,
  strings, containers, and allowlisted globals only.
- REDUCE: ``func(*args)``, i.e. calling the allowlisted object with arguments
  from the file. For a class that would run its ``__init__`` with any
  arguments (``nn.Linear(10**6, 10**6)`` allocates terabytes). So the name of
  each class is bound to a stand-in whose ``__new__`` makes a bare instance of
  the real class and which refuses to be called; the real class is
  registered under a name no pickle can spell (it contains a newline, and
  GLOBAL reads its names line by line) only so that BUILD accepts its
  instances. A pickle can thus create instances and set their attributes,
  never construct or call.

What the file controls is data: attribute values from that same small set of
types. Hooks and ``forward`` overrides in ``__dict__`` can only be
allowlisted callables (torch's default weights_only set, these stand-ins,
``F.relu`` and ``F.gelu``, which Transformer layers keep as their
activation), all of which compute on tensors and touch no files or
processes. Running the module then runs torch.nn's own code over that data.

torchvision/timm classes are not added: their modules' ``__init__`` is never
run here, but their ``forward`` methods trust attributes set by it (callables
such as ``norm_layer`` or ``act_layer`` factories, block lists), and each
library version changes them; torch.nn is the one set whose code ships with
the torch that does the unpickling.
"""

from __future__ import annotations

import functools
import pickle
import sys


class _RebuildOnly(type):
    """Metaclass of the stand-ins: calling one (pickle's REDUCE) is refused."""

    def __call__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(
            f"{cls.__module__}.{cls.__qualname__} may be rebuilt from its state, not called")


def _stand_in(real: type) -> type:
    def __new__(cls, *args):
        if args:
            raise pickle.UnpicklingError(f"{real.__qualname__} is rebuilt without arguments")
        return real.__new__(real)

    return _RebuildOnly(real.__name__, (), {"__new__": __new__, "__module__": real.__module__,
                                             "__qualname__": real.__qualname__})


def nn_module_classes() -> list[type]:
    """Every nn.Module subclass defined in a ``torch.nn.modules.*`` module."""
    import torch.nn as nn

    found = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("torch.nn.modules.") or module is None:
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, nn.Module)
                    and value.__module__ == module_name):
                found.append(value)
    return found


def _full_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@functools.cache
def _allowlist() -> tuple[tuple[object, str], ...]:
    import torch
    import torch.nn.functional as F

    entries: list[tuple[object, str]] = []
    for cls in nn_module_classes():
        entries.append((_stand_in(cls), _full_name(cls)))       # what a pickle can name
        entries.append((cls, f"{cls.__module__}\n{cls.__qualname__}"))  # only for BUILD's check
    # activations that Transformer layers keep as attributes
    entries += [(F.relu, "torch.nn.functional.relu"), (torch._C._nn.gelu, "torch._C._nn.gelu")]
    return tuple(entries)


def nn_global_names() -> frozenset[str]:
    """The globals a pickle may name inside ``nn_safe_globals()``."""
    return frozenset(name for _, name in _allowlist() if "\n" not in name)


def nn_safe_globals():
    """A ``torch.serialization.safe_globals`` context that admits torch.nn modules."""
    import torch

    return torch.serialization.safe_globals(list(_allowlist()))
