"""--save-code, the graph: every name and call the forward's source holds, checked against
the allowlists before the source is generated, and the source with its import lines."""

from __future__ import annotations

import builtins
import importlib
import inspect
import io
import sys
import tokenize

import torch
import torch.nn as nn
from torch import fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .._names import is_class_name, is_fqn, is_identifier, refused
from ..errors import ExportError


# Where a function the graph calls may come from: the package imports it by name.
_IMPORTABLE = ("torch", "ressurgeon", "operator", "math", "builtins")
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
