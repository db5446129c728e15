"""--save-code, the tensors: the state_dict and the constants a package stores, each tensor
once, as safetensors bytes."""

from __future__ import annotations


import torch
import torch.nn as nn

from .._names import is_fqn, refused
from ..errors import ExportError, brief
from .calls import _join, _modules


def _tensor_slots(module: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    """(path, tensor, kind) for every tensor the model holds: "state" (a parameter or a
    persistent buffer, in the state_dict) first, then "constant" (the rest)."""
    state, constant = [], []
    for path, sub in _modules(module):
        for name, t in sub._parameters.items():
            if t is not None:
                state.append((_join(path, name), t, "state"))
        for name, t in sub._buffers.items():
            if t is not None:
                kind = "constant" if name in sub._non_persistent_buffers_set else "state"
                (state if kind == "state" else constant).append((_join(path, name), t, kind))
        for name, t in vars(sub).items():
            if isinstance(t, torch.Tensor):
                constant.append((_join(path, name), t, "constant"))
    return state + constant


def _tensor_files(module: nn.Module) -> tuple[dict, dict, dict[str, str], list[str]]:
    """(state tensors, constant tensors, {alias: the name it is stored under}, frozen)."""
    first: dict[int, str] = {}
    files: dict[str, dict] = {"state": {}, "constant": {}}
    tied: dict[str, str] = {}
    frozen = []
    for path, t, kind in _tensor_slots(module):
        if not is_fqn(path):
            raise refused("a tensor name written by --save-code", path,
                          "a dotted path of identifiers and indices")
        if id(t) in first:
            tied[path] = first[id(t)]
            continue
        first[id(t)] = path
        files[kind][path] = t
        if isinstance(t, nn.Parameter) and not t.requires_grad:
            frozen.append(path)
    return files["state"], files["constant"], tied, frozen


def _check_storable(tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor is one safetensors can store: dense, plain, not quantized."""
    for name, t in tensors.items():
        if t.layout is not torch.strided or t.is_quantized or \
                type(t) not in (torch.Tensor, nn.Parameter):
            kind = "quantized" if t.is_quantized else str(t.layout)
            raise ExportError(f"--save-code stores tensors as safetensors; {name!r} is a "
                              f"{type(t).__name__} ({kind}): write the model as .pt2")


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    out = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    storages: dict[int, int] = {}
    for t in out.values():
        storages[t.untyped_storage().data_ptr()] = storages.get(t.untyped_storage().data_ptr(),
                                                                0) + 1
    for name, t in out.items():
        if storages[t.untyped_storage().data_ptr()] > 1 or \
                t.untyped_storage().nbytes() != t.numel() * t.element_size():
            out[name] = t.clone()  # safetensors stores each tensor in storage of its own
    try:
        return save(out)
    except Exception as exc:
        raise ExportError(f"--save-code could not write the weights as safetensors "
                          f"({brief(exc)}); write the model as .pt2") from exc
