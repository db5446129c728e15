"""Stage 6, save: a rewritten GraphModule as a Python package that rebuilds it by constructor calls.

``build_package`` makes what ``save_code`` puts in a ``--save-code`` folder:

- ``module.py``: one class whose ``__init__`` calls the constructor of every
  submodule (torch.nn classes with the arguments read back from the module's
  own attributes, ressurgeon's modules with the arguments their
  ``constructor_args()`` gives) and whose ``forward`` is the fx graph's code;
- ``model.safetensors``: the state_dict, each tensor once (tied parameters are
  stored under their first name and tied again on load), loaded with
  ``strict=True`` from the package's own folder;
- ``constants.safetensors`` (when the model has any): the tensors that are no
  part of the state_dict (non-persistent buffers, fx's ``_tensor_constant0``).

Decide, then write: every name that reaches the source (child, parameter and
node names, attribute paths, the functions the graph calls) is checked against
the identifier allowlist of ``_names`` before any source is generated, and
every constructor call is checked by building it (on the meta device) and
comparing it with the module it stands for: same submodules, tensor names and
shapes, plain attributes and repr. A leaf of any other class (a user's or a
third party's) is refused, or, with ``trust_pickle``, stored as a pickle that
``module.py`` loads with ``weights_only=False``, said in a comment there.
"""

from __future__ import annotations

import builtins
import enum
import importlib
import inspect
import io
import keyword
import math
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ._names import is_class_name, is_fqn, is_identifier, refused
from ._io import owned_folder
from .errors import ExportError, brief

WEIGHTS = "model.safetensors"
CONSTANTS = "constants.safetensors"

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
# Where a function the graph calls may come from: the package imports it by name.
_IMPORTABLE = ("torch", "ressurgeon", "operator", "math", "builtins")
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


# -- the graph: names and calls the forward's source holds --------------------------------

_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, type(...), torch.dtype,
                   torch.device, torch.memory_format, torch.layout)


def check_graph(gm: fx.GraphModule) -> None:
    """Every name and constant the forward's source will hold is one source can only read
    as what it is: identifiers, attribute paths that lead to a module or tensor, plain
    constants; UnsafeFileError (a name) or ExportError (a value) otherwise."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise ExportError("--save-code writes graphs with plain fx code generation; this one "
                          f"uses {type(gm.graph._codegen).__name__}: write the model as .pt2")
    for node in gm.graph.nodes:
        where = f"node {node.name[:60]!r}"
        if not is_identifier(node.name):
            raise refused("a node name written by --save-code", node.name, "a Python identifier")
        if node.op == "placeholder" and not is_identifier(node.target):
            raise refused("an input name written by --save-code", node.target,
                          "a Python identifier", where=where)
        if node.op in ("get_attr", "call_module"):
            if not is_fqn(node.target):
                raise refused("an attribute path written by --save-code", node.target,
                              "a dotted path of identifiers and indices", where=where)
            found = _lookup(gm, node.target)
            wanted = nn.Module if node.op == "call_module" else (torch.Tensor, nn.Module)
            if not isinstance(found, wanted):
                raise ExportError(f"--save-code: {where} reads {node.target!r}, which is no "
                                  "module or tensor of the model")
        if node.op == "call_method" and not is_identifier(node.target):
            raise refused("a method name written by --save-code", node.target,
                          "a Python identifier", where=where)
        for key in node.kwargs:
            if not is_identifier(key):
                raise refused("a keyword written by --save-code", key, "a Python identifier",
                              where=where)
        _check_constants(node.args, where)
        _check_constants(tuple(node.kwargs.values()), where)


def _lookup(root: nn.Module, path: str):
    value = root
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _check_constants(value, where: str) -> None:
    if isinstance(value, fx.Node) or isinstance(value, _CONSTANT_TYPES):
        return
    if isinstance(value, torch._ops.OpOverload):
        return
    if type(value) in (tuple, list, torch.Size, immutable_list):
        for v in value:
            _check_constants(v, where)
        return
    if type(value) is slice:
        _check_constants((value.start, value.stop, value.step), where)
        return
    if type(value) in (dict, immutable_dict) and all(is_identifier(k) for k in value):
        _check_constants(tuple(value.values()), where)
        return
    raise ExportError(f"--save-code: {where} takes a {type(value).__name__}, which the "
                      "written source cannot spell; write the model as .pt2")


def forward_source(gm: fx.GraphModule) -> tuple[str, list[str], list[str]]:
    """The forward's code (from a copy of the graph without metadata: no comment from a
    file's stack traces reaches it), the imports the names it uses need, and the
    ``torch.fx.wrap`` lines for the wrapped functions among them."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        node.meta = {}
        node.type = None
    code = graph.python_code("self")
    used = _names(code.src)
    imports, wraps = [], []
    for name, obj in code.globals.items():
        if name not in used:
            continue
        custom = fx.graph._custom_builtins.get(name)
        if custom is not None and custom.obj is obj:
            imports.append(custom.import_str)
        elif getattr(builtins, name, None) is obj:
            continue
        else:
            imports.append(_import_line(name, obj))
            if _fx_wrapped(obj):  # fx tracing of the package keeps the call whole, as here
                wraps.append(f'torch.fx.wrap("{name}")')
    return code.src.strip("\n"), imports, wraps


def _fx_wrapped(obj) -> bool:
    """``obj`` was registered with ``torch.fx.wrap`` in the module that defines it."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    registered = getattr(fx._symbolic_trace, "_wrapped_fns_to_patch", {})
    return module is not None and (id(vars(module)), getattr(obj, "__name__", None)) in registered


def _names(src: str) -> set[str]:
    return {tok.string for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.NAME}


def _import_line(name: str, obj) -> str:
    """``from module import attr as name`` for a function the graph calls, checked to resolve."""
    if inspect.ismodule(obj):
        module, attr = obj.__name__, None
    else:
        module = getattr(obj, "__module__", None) or ""
        module = "operator" if module == "_operator" else module
        attr = getattr(obj, "__qualname__", None)
    shown = f"{module}.{attr}" if attr else module
    if not (is_identifier(name) and is_class_name(module) and (attr is None or is_identifier(attr))
            and module.split(".")[0] in _IMPORTABLE):
        raise ExportError(f"--save-code: the graph calls {shown[:80]!r}, which the written "
                          "module cannot import by name; write the model as .pt2")
    try:
        imported = importlib.import_module(module)
        found = imported if attr is None else getattr(imported, attr, None)
    except ImportError:
        found = None
    if found is not obj:
        raise ExportError(f"--save-code: the graph calls {shown[:80]!r}, which the written "
                          "module cannot import by name; write the model as .pt2")
    if attr is None:
        return f"import {module}" if name == module else f"import {module} as {name}"
    return f"from {module} import {attr}" + ("" if name == attr else f" as {name}")


# -- rendering --------------------------------------------------------------------------------

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


def _own_tensors(module: nn.Module) -> bool:
    return bool(module._parameters or module._buffers)


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


# -- the tensors --------------------------------------------------------------------------

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


# -- the package ----------------------------------------------------------------------------

_HEADER = '''"""{name}: written by ressurgeon --save-code.

__init__ builds every submodule by a constructor call (on the meta device: shapes only) and
loads every tensor from {weights} in this folder (strict=True){constants}.
forward is the rewritten graph's code. Importing this package needs torch, safetensors and
ressurgeon (its shortcut modules and the input checks a torch.export capture adds).
"""

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
'''

_LOADER = '''

_HERE = Path(__file__).parent
# tensors the model holds under several names: {{name: the name they are stored under}}
_TIED = {tied}
# parameters that do not train (requires_grad=False)
_FROZEN = {frozen}


def _get(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _set(model, path, value):
    owner, _, name = path.rpartition(".")
    setattr(_get(model, owner) if owner else model, name, value)


def _load_weights(model):
    """Every tensor from this folder: the state_dict (strict), then the constants."""
    state = load_file(_HERE / "{weights}")
    keys = set(model.state_dict())
    state.update({{alias: state[name] for alias, name in _TIED.items() if alias in keys}})
    model.load_state_dict(state, strict=True, assign=True)
{constants_load}    for alias, name in _TIED.items():
        _set(model, alias, _get(model, name))
    for name in _FROZEN:
        _get(model, name).requires_grad_(False)
'''

_CONSTANTS_LOAD = '''    for path, tensor in load_file(_HERE / "{constants}").items():
        _set(model, path, tensor)  # non-persistent buffers and tensor attributes
'''


@dataclass(frozen=True)
class CodePackage:
    """A ``--save-code`` package, checked and made, not yet written.

    ``texts``: module.py and __init__.py; ``tensors``: {file: {name: tensor}}, the
    model's own tensors (serialised only by ``write``); ``pickles``: {file: submodule},
    only with ``trust_pickle``.
    """

    name: str
    texts: dict[str, str]
    tensors: dict[str, dict[str, torch.Tensor]]
    pickles: dict[str, nn.Module]

    @property
    def source(self) -> str:
        """module.py's text."""
        return self.texts["module.py"]

    def write(self, folder: str | Path) -> Path:
        """Write the files into ``folder`` (new, or one ressurgeon wrote: ``_io.owned_folder``)."""
        folder = Path(folder)
        with owned_folder(folder) as tmp:
            for file, text in self.texts.items():
                (tmp / file).write_text(text)
            for file, tensors in self.tensors.items():
                (tmp / file).write_bytes(_safetensors_bytes(tensors))
            for file, child in self.pickles.items():
                buffer = io.BytesIO()  # torch's writer aborts on a full disk; Python's raises
                torch.save(child, buffer)
                (tmp / file).write_bytes(buffer.getbuffer())
        return folder


def build_package(module: fx.GraphModule, *, name: str = "RewrittenModel",
                  trust_pickle: bool = False) -> CodePackage:
    """``module`` as the files of a package: module.py, __init__.py, the weights.

    ``name`` must be checked as an identifier by the caller; every other name is
    checked here before any source is generated.

    Raises:
        UnsafeFileError: a name that is not an identifier (or index path).
        ExportError: a submodule no constructor call rebuilds (without ``trust_pickle``),
            a call or value the source cannot spell, safetensors missing.
    """
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise ExportError("--save-code writes the weights as safetensors: "
                          "pip install 'ressurgeon[safetensors]'") from exc
    check_graph(module)
    planner = _Planner(trust_pickle)
    root = planner.plan("", module, root=True)
    forward, forward_imports, wraps = forward_source(module)
    state, constants, tied, frozen = _tensor_files(module)

    src = _Source({name, "nn", "torch", "Path", "load_file", "OrderedDict", "_HERE", "_TIED",
                   "_FROZEN", "_get", "_set", "_load_weights"})
    src.module(root)
    pickled = []
    for spec in _walk(root):
        if spec.pickle is not None:  # a child only unpickling rebuilds: the user trusted it
            pickled += [f"# --trust-pickle: {spec.pickle} is a pickle; loading it runs code "
                        "it names (weights_only=False)",
                        _assignment(spec.path, f"torch.load(_HERE / {spec.pickle!r}, "
                                    "weights_only=False)")]
    body = ["super().__init__()", 'with torch.device("meta"):  # shapes only: the tensors are '
            f"loaded from {WEIGHTS}"]
    body += [f"    {line}" for line in src.lines] or ["    pass"]
    body += pickled
    body += src.ties
    body.append("_load_weights(self)")
    imports = list(dict.fromkeys(forward_imports + src.imports))
    text = _HEADER.format(name=name, weights=WEIGHTS,
                          constants=f" and {CONSTANTS}" if constants else "")
    text += "".join(f"{line}\n" for line in imports if line != "import torch")
    text += "".join(f"\n{line}" for line in wraps) + ("\n" if wraps else "")
    text += _LOADER.format(tied=_literal(tied), frozen=_literal(tuple(frozen)), weights=WEIGHTS,
                           constants_load=_CONSTANTS_LOAD.format(constants=CONSTANTS)
                           if constants else "")
    text += f"\n\nclass {name}(nn.Module):\n    def __init__(self):\n"
    text += "".join(f"        {line}\n" for line in body)
    text += "\n" + "".join(f"    {line}\n" if line.strip() else "\n"
                           for line in forward.splitlines())
    try:  # a name that is a keyword (an input named ``lambda``) surfaces here, not on import
        compile(text, "module.py", "exec")
    except SyntaxError as exc:
        raise ExportError(f"--save-code: the module.py it would write does not compile "
                          f"({exc.msg}, line {exc.lineno}: {(exc.text or '').strip()[:60]!r}); "
                          "write the model as .pt2") from exc

    init = (f'"""Written by ressurgeon --save-code."""\n\nfrom .module import {name}\n\n'
            f'__all__ = ["{name}"]\n')
    tensors = {WEIGHTS: state, **({CONSTANTS: constants} if constants else {})}
    for stored in tensors.values():
        _check_storable(stored)
    return CodePackage(name, {"module.py": text, "__init__.py": init}, tensors,
                       dict(planner.pickles))


def _assignment(path: str, expr: str) -> str:
    owner, _, leaf = path.rpartition(".")
    if _attribute(leaf):
        return f"{_ref(owner)}.{leaf} = {expr}"
    return f"{_ref(owner)}.add_module({leaf!r}, {expr})"


def _literal(value) -> str:
    """A dict or tuple of checked names, one entry a line when long."""
    if not value:
        return "{}" if isinstance(value, dict) else "()"
    if isinstance(value, dict):
        return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in value.items()) + "}"
    return "(\n" + "".join(f"    {v!r},\n" for v in value) + ")"


__all__ = ["CodePackage", "build_package", "check_graph", "forward_source", "SIGNATURES", "DERIVED",
           "WEIGHTS", "CONSTANTS"]
