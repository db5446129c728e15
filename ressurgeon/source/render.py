"""--save-code, rendering: module.py's class from the checked plan."""

from __future__ import annotations

import keyword
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from .._names import is_identifier
from .calls import _Call, _Spec, _expressible


class _Source:
    """The text of module.py: import lines, the build statements, the class around them."""

    def __init__(self, reserved: set[str]):
        self.taken: dict[str, object] = {n: None for n in reserved}
        self.imports: list[str] = []
        self.lines: list[str] = []
        self.ties: list[str] = []

    def cls_name(self, cls: type) -> str:
        if getattr(nn, cls.__name__, None) is cls:
            return f"nn.{cls.__name__}"
        name = cls.__name__
        i = 1
        while name in self.taken and self.taken[name] is not cls:
            name, i = f"{cls.__name__}_{i}", i + 1
        if name not in self.taken:
            self.taken[name] = cls
            self.imports.append(f"from {cls.__module__} import {cls.__name__}"
                                + ("" if name == cls.__name__ else f" as {name}"))
        return name

    def value(self, v) -> str:
        if isinstance(v, _Spec):
            if v.alias is not None:  # a tied module: built here, replaced once all exist
                self.ties.append(f"{_ref(v.path)} = {_ref(v.alias)}")
            return self.value(v.call) if v.call is not None else self._container(v)
        if isinstance(v, _Call):
            args = [self.value(a) for a in v.args]
            args += [f"{k}={self.value(x)}" for k, x in v.kwargs.items()]
            return f"{self.cls_name(v.cls)}({', '.join(args)})"
        if isinstance(v, list):
            return f"[{', '.join(self.value(x) for x in v)}]"
        if isinstance(v, tuple):
            inner = ", ".join(self.value(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if isinstance(v, float) and not math.isfinite(v):
            return f"float({str(v)!r})"
        if isinstance(v, torch.dtype):
            return str(v)  # torch.float32
        return repr(v)

    def module(self, spec: _Spec) -> None:
        """Statements that put ``spec``'s module at its path (its owner exists already)."""
        if spec.alias is not None:
            self.ties.append(f"{_ref(spec.path)} = {_ref(spec.alias)}")
            return
        if spec.pickle is not None:
            return  # loaded after the meta block, see ``pickled``
        if spec.call is not None:
            self._assign(spec.path, self.value(spec.call))
            return
        if spec.path:
            expr = self._container(spec)
            self._assign(spec.path, expr or f"{self.cls_name(type(spec.module))}()")
            if expr is not None:
                return
        self._tensors(spec)
        for child in spec.children.values():
            self.module(child)

    def _container(self, spec: _Spec) -> str | None:
        """A container whose children are all calls, as one expression (else None)."""
        if not _expressible(spec):
            return None
        kids = spec.children
        cls = self.cls_name(type(spec.module))
        calls = [self.value(c) for c in kids.values()]
        if isinstance(spec.module, nn.ModuleDict):
            return f"{cls}({{{', '.join(f'{k!r}: {c}' for k, c in zip(kids, calls))}}})"
        if isinstance(spec.module, nn.ModuleList):
            return f"{cls}([{', '.join(calls)}])"
        if list(kids) == [str(i) for i in range(len(kids))]:
            return f"{cls}({', '.join(calls)})"
        self.imports.append("from collections import OrderedDict")  # a reserved name
        pairs = ", ".join(f"({k!r}, {c})" for k, c in zip(kids, calls))
        return f"{cls}(OrderedDict([{pairs}]))"

    def _tensors(self, spec: _Spec) -> None:
        """A group's own parameters and buffers, empty: model.safetensors fills them."""
        owner = _ref(spec.path)
        module = spec.module
        for name, p in module._parameters.items():
            value = "None" if p is None else f"nn.Parameter(torch.empty({_shape(p)}))"
            self.lines.append(f"{owner}.register_parameter({name!r}, {value})")
        for name, b in module._buffers.items():
            persistent = name not in module._non_persistent_buffers_set
            value = "None" if b is None else f"torch.empty({_shape(b)})"
            self.lines.append(f"{owner}.register_buffer({name!r}, {value}"
                              + ("" if persistent else ", persistent=False") + ")")

    def _assign(self, path: str, expr: str) -> None:
        self.lines.append(_assignment(path, expr))


def _shape(t: torch.Tensor) -> str:
    return ", ".join(str(int(s)) for s in t.shape) if t.dim() else "()"


def _ref(path: str) -> str:
    """``self.a.b`` for a path, ``getattr(self.a, '0')`` for its index (or keyword) parts."""
    out = "self"
    for part in path.split(".") if path else ():
        out = f"{out}.{part}" if _attribute(part) else f"getattr({out}, {part!r})"
    return out


def _attribute(name: str) -> bool:
    """``name`` may follow a dot in source (an identifier, not a keyword such as ``class``)."""
    return is_identifier(name) and not keyword.iskeyword(name)


def _walk(spec: _Spec) -> Iterator[_Spec]:
    yield spec
    for child in spec.children.values():
        yield from _walk(child)


def _assignment(path: str, expr: str) -> str:
    owner, _, leaf = path.rpartition(".")
    if _attribute(leaf):
        return f"{_ref(owner)}.{leaf} = {expr}"
    return f"{_ref(owner)}.add_module({leaf!r}, {expr})"
