"""--save-code, the plan: what each submodule becomes (a constructor call, a container
with its children, a pickle), each call checked by building it on the meta device and
comparing it with the module it stands for."""

from __future__ import annotations

import enum
import importlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._names import is_class_name, is_identifier
from ..errors import ExportError, brief


# Constructor parameters of torch.nn classes whose __init__ takes only (*args, **kwargs):
# (the required ones, {the others: their defaults}).
_RECURRENT = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
              "bidirectional": False}
SIGNATURES: dict[type, tuple[tuple[str, ...], dict]] = {
    nn.LSTM: (("input_size", "hidden_size"), {**_RECURRENT, "proj_size": 0}),
    nn.GRU: (("input_size", "hidden_size"), _RECURRENT),
    nn.RNN: (("input_size", "hidden_size"), {**_RECURRENT, "nonlinearity": "tanh"}),
}
# Constructor parameters a torch.nn module keeps in another form than an attribute of that name.
DERIVED = {
    (nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
}
# Containers: built empty, their children added one by one (or passed when all are calls).
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_FACTORY = ("device", "dtype")  # constructor parameters that only place the tensors


def _refuse(path: str, module: nn.Module, why: str) -> ExportError:
    cls = type(module)
    return ExportError(
        f"--save-code cannot rebuild submodule {path or 'the model'!r} "
        f"({cls.__module__}.{cls.__qualname__}): {why}; module.py rebuilds torch.nn classes "
        "and ressurgeon's modules by constructor calls: pass --trust-pickle "
        "(trust_pickle=True) to store it as a pickle that module.py loads "
        "with weights_only=False, or write the model as .pt2 (-o)")


# -- the plan: what each submodule becomes ----------------------------------------------------

@dataclass
class _Call:
    """A constructor call; ``args``/``kwargs`` hold plain values and child ``_Spec``s."""

    cls: type
    args: tuple
    kwargs: dict


@dataclass
class _Spec:
    """How one submodule is written: a call, an empty container filled child by child
    (``children``), a pickle (``pickle``: its file), or another path's module (``alias``)."""

    path: str
    module: nn.Module
    call: _Call | None = None
    children: dict[str, "_Spec"] = field(default_factory=dict)
    pickle: str | None = None
    alias: str | None = None


class _Planner:
    """Walks the module tree once: a spec per submodule, refusals before anything is written."""

    def __init__(self, trust_pickle: bool):
        self.trust_pickle = trust_pickle
        self.seen: dict[int, str] = {}   # id(module) -> the first path it was met at
        self.pickles: list[tuple[str, nn.Module]] = []

    def plan(self, path: str, module: nn.Module, *, root: bool = False) -> _Spec:
        first = self.seen.get(id(module))
        if first is not None:
            return _Spec(path, module, alias=first)
        self.seen[id(module)] = path
        if root or type(module) is nn.Module or type(module) in _CONTAINERS:
            return self._group(path, module)
        seen, pickles = dict(self.seen), len(self.pickles)
        try:
            return _Spec(path, module, call=self._call(path, module))
        except ExportError:
            if not self.trust_pickle:
                raise
            self.seen = seen  # what the failed call planned is not written
            del self.pickles[pickles:]
            name = f"pickled_{len(self.pickles)}.pt"
            self.pickles.append((name, module))
            return _Spec(path, module, pickle=name)

    def _group(self, path: str, module: nn.Module) -> _Spec:
        spec = _Spec(path, module)
        for name, child in module._modules.items():
            if child is not None:
                spec.children[name] = self.plan(_join(path, name), child)
        return spec

    def _call(self, path: str, module: nn.Module) -> _Call:
        """The constructor call for a leaf (or a ressurgeon module with children), checked."""
        try:
            return self._checked_call(path, module)
        except ExportError:
            raise
        except Exception as exc:  # a module whose attributes no call reproduces
            raise _refuse(path, module, f"reading its constructor arguments failed "
                          f"({brief(exc)})") from exc

    def _checked_call(self, path: str, module: nn.Module) -> _Call:
        cls = type(module)
        _importable(cls, path, module)
        if cls.__module__.startswith("ressurgeon.") and hasattr(cls, "constructor_args"):
            args, kwargs = module.constructor_args()
        elif cls.__module__.startswith("torch.nn."):
            args, kwargs = _torch_args(path, module)
        else:
            raise _refuse(path, module, "it is neither a torch.nn class nor ressurgeon's")
        names = {id(m): n for n, m in module.named_modules() if n}  # its submodules, any depth
        value = lambda v: self._value(path, module, names, v)  # noqa: E731
        call = _Call(cls, tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()})
        _check_rebuilt(path, module, call)
        return call

    def _value(self, path: str, module: nn.Module, names: dict, value):
        if isinstance(value, nn.Module):
            name = names.get(id(value))
            if name is None:
                raise _refuse(path, module, "a constructor argument is a module that is not "
                              "one of its submodules")
            child = _join(path, name)
            if id(value) in self.seen:  # tied: rebuilt here, tied again once everything exists
                return _Spec(child, value, call=self._call(child, value),
                             alias=self.seen[id(value)])
            spec = self.plan(child, value)
            if spec.call is None and not _expressible(spec):
                raise _refuse(child, value, "no constructor call rebuilds it")
            return spec
        if isinstance(value, (list, tuple)):
            return type(value)(self._value(path, module, names, v) for v in value)
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
            return value
        raise _refuse(path, module, f"a constructor argument is a {type(value).__name__}, "
                      "which source cannot spell")


def _expressible(spec: _Spec) -> bool:
    """A call, or a container of calls without tensors of its own: one expression."""
    if spec.call is not None:
        return spec.alias is None
    return (type(spec.module) in _CONTAINERS and spec.pickle is None and spec.alias is None
            and not _own_tensors(spec.module)
            and all(_expressible(c) for c in spec.children.values()))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _importable(cls: type, path: str, module: nn.Module) -> None:
    """The class can be imported by its module and name (no local or renamed class)."""
    if not (is_class_name(cls.__module__) and is_identifier(cls.__qualname__)):
        raise _refuse(path, module, "its class cannot be imported by name")
    try:
        found = getattr(importlib.import_module(cls.__module__), cls.__qualname__, None)
    except ImportError:
        found = None
    if found is not cls:
        raise _refuse(path, module, "its class cannot be imported by name")


def _torch_args(path: str, module: nn.Module) -> tuple[tuple, dict]:
    """A torch.nn module's constructor arguments, read from its attributes of the same names.

    Required parameters go by position, others by keyword when they differ from
    the default; ``bias=True``-style flags are read from whether the tensor exists.
    """
    cls = type(module)
    if cls in SIGNATURES:
        required, optional = SIGNATURES[cls]
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in required]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
                   for n, d in optional.items()]
    else:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args, kwargs = [], {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _FACTORY:
            continue
        derive = DERIVED.get((cls, p.name))
        if derive is not None:
            value = derive(module)
        elif hasattr(module, p.name):
            value = getattr(module, p.name)
            if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None  # Linear(bias=True) keeps a Parameter named bias
        elif p.default is not p.empty:
            continue
        else:
            raise _refuse(path, module, f"its constructor argument {p.name!r} is not kept "
                          "as an attribute")
        if p.default is p.empty:
            args.append(value)
        elif not _same(value, p.default):
            kwargs[p.name] = value
    return tuple(args), kwargs


def _same(value, default) -> bool:
    """``value`` is what the default gives (Conv2d keeps stride=1 as (1, 1))."""
    if isinstance(value, tuple) and value and not isinstance(default, tuple):
        return all(_same(v, default) for v in value)
    return type(value) is type(default) and value == default


# -- checking a call by building it --------------------------------------------------------

def _build(call):
    if isinstance(call, _Spec):
        return _build(call.call) if call.call is not None else _build_group(call)
    if isinstance(call, _Call):
        return call.cls(*(_build(a) for a in call.args),
                        **{k: _build(v) for k, v in call.kwargs.items()})
    if isinstance(call, (list, tuple)):
        return type(call)(_build(v) for v in call)
    return call


def _build_group(spec: _Spec) -> nn.Module:
    group = type(spec.module)()
    for name, child in spec.children.items():
        group.add_module(name, _build(child))
    return group


def _check_rebuilt(path: str, module: nn.Module, call: _Call) -> None:
    """The call builds what ``module`` is: submodules, tensors, plain attributes, repr."""
    try:
        with torch.device("meta"):
            rebuilt = _build(call)
    except Exception as exc:
        raise _refuse(path, module, f"its constructor call fails ({brief(exc)})") from exc
    if [n for n, _ in _modules(module)] != [n for n, _ in _modules(rebuilt)]:
        raise _refuse(path, module, "its constructor builds other submodules")
    for (name, a), (_, b) in zip(_modules(module), _modules(rebuilt)):
        if type(a) is not type(b):
            raise _refuse(_join(path, name), a, "its constructor builds a "
                          f"{type(b).__name__} there")
    if _tensors(module) != _tensors(rebuilt):
        raise _refuse(path, module, "its constructor builds other parameters or buffers "
                      "(names or shapes)")
    for (name, a), (_, b) in zip(_modules(module), _modules(rebuilt)):
        if _plain(a) != _plain(b):
            diff = sorted(k for k in _plain(a).keys() | _plain(b).keys()
                          if _plain(a).get(k, ...) != _plain(b).get(k, ...))
            raise _refuse(_join(path, name), a, "its constructor call gives other attribute "
                          f"values ({', '.join(diff[:3])})")
    if repr(module) != repr(rebuilt):
        raise _refuse(path, module, "its constructor call gives another repr")


def _modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(module.named_modules(remove_duplicate=False))


def _tensors(module: nn.Module) -> dict[str, tuple]:
    found = {}
    for name, sub in _modules(module):
        for kind, table in (("parameter", sub._parameters), ("buffer", sub._buffers)):
            for leaf, t in table.items():
                persistent = leaf not in sub._non_persistent_buffers_set
                found[_join(name, leaf)] = (kind, persistent, None if t is None else tuple(t.shape))
        for leaf, t in vars(sub).items():
            if isinstance(t, torch.Tensor):
                found[_join(name, leaf)] = ("attribute", False, tuple(t.shape))
    return found


def _plain(module: nn.Module) -> dict:
    """The attributes that are plain values (what a constructor sets), the mode aside."""
    return {k: v for k, v in vars(module).items() if k != "training" and _is_plain(v)}


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, enum.Enum)):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_is_plain(v) for v in value)
    return False


def _own_tensors(module: nn.Module) -> bool:
    return bool(module._parameters or module._buffers)
