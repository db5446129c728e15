"""TorchScript files (only with --trust-pickle) and their conversion to a traceable module."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .._torch import quiet_torch
from ..errors import LoadError, UnsafeFileError, brief
from ..capture.exported import plain_graph_module
from .common import SAFE_ROUTES, TRUST_ONLY_YOURS


def _load_torchscript(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise UnsafeFileError(
            f"{path} is a TorchScript archive, a program that runs when loaded; "
            f"{SAFE_ROUTES}; or {TRUST_ONLY_YOURS}")
    try:
        with quiet_torch():
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{path} is not a loadable TorchScript archive ({brief(exc)}); "
                        f"{SAFE_ROUTES}") from exc


def from_torchscript(module: nn.Module, example_inputs: tuple) -> nn.Module:
    """A trainable GraphModule from a TorchScript module; any other module is returned as is.

    torch's converter turns every weight into a buffer and freezes BatchNorm
    and Dropout in the module's mode; the parameters are made parameters
    again (matched by name and value with the ScriptModule's) and BatchNorm
    and Dropout become modules that follow ``.train()``, as for a ``.pt2``.

    Args:
        module: what ``load_model(..., trust_pickle=True)`` returned for a
            TorchScript archive.
        example_inputs: a tuple of tensors the model accepts.

    Returns:
        A GraphModule with the same parameters, buffers and outputs.

    Raises:
        LoadError: the converter is missing from this torch, or cannot
            convert the program (e.g. Python control flow on input values).

    Example:
        >>> ts = load_model("scripted.pt", trust_pickle=True)          # doctest: +SKIP
        >>> model = from_torchscript(ts, (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
    """
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    ep = _convert_torchscript(module, tuple(example_inputs))
    branches = sorted({str(getattr(n.target, "__name__", n.target)) for n in ep.graph.nodes
                       if isinstance(n.target, torch._ops.HigherOrderOperator)})
    if branches:
        raise LoadError(f"the TorchScript model branches or loops on input values (it became "
                        f"torch.{branches[0]}), which ressurgeon cannot rewrite; {SAFE_ROUTES}")
    unlifted = ep.module()
    _restore_parameters(unlifted, module)
    gm = plain_graph_module(unlifted)
    gm.train(module.training)
    return gm


def _convert_torchscript(module: torch.jit.ScriptModule,
                         example_inputs: tuple) -> torch.export.ExportedProgram:
    """The one use of torch's private TorchScript converter."""
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError as exc:
        raise LoadError(f"torch {torch.__version__} has no TorchScript converter "
                        f"(torch._export.converter); {SAFE_ROUTES}") from exc
    try:
        with quiet_torch(stdout=True, stderr=True):
            return TS2EPConverter(module, example_inputs).convert()
    except Exception as exc:
        raise LoadError(f"the TorchScript model cannot be converted to a graph ({brief(exc)}); "
                        f"{SAFE_ROUTES}") from exc


def _restore_parameters(unlifted: nn.Module, script: torch.jit.ScriptModule) -> None:
    """Turn the converter's buffers back into the ScriptModule's parameters."""
    buffers = dict(unlifted.named_buffers())
    taken: set[str] = set()

    def holds(key: str, value: torch.Tensor) -> bool:
        b = buffers[key]
        return (key not in taken and b.shape == value.shape and b.dtype == value.dtype
                and torch.equal(b, value))

    for name, param in script.named_parameters():
        value = param.detach()
        target = name if name in buffers and holds(name, value) else None
        if target is None:  # renamed by the converter: the one buffer holding the same values
            matches = [k for k in buffers if holds(k, value)]
            target = matches[0] if len(matches) == 1 else None
        if target is None:
            raise LoadError(f"the converted TorchScript model lost its parameter {name}; "
                            f"{SAFE_ROUTES}")
        taken.add(target)
        owner_path, _, leaf = target.rpartition(".")
        owner = unlifted.get_submodule(owner_path)
        del owner._buffers[leaf]
        owner.register_parameter(leaf, nn.Parameter(buffers[target],
                                                    requires_grad=param.requires_grad))
