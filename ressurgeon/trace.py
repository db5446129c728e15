"""Stage 2, trace: module + example inputs -> GraphModule with shapes in node.meta.

torch.fx ``symbolic_trace`` first, because it keeps the user's modules (a
BatchNorm stays a BatchNorm and trains like one). When fx cannot follow the
model (Python control flow on tensors or shapes), torch.export captures it
and ``graph_module_from_export`` turns mode-dependent ops back into modules so
the result still trains like the original; its batch dimension stays dynamic
where the model allows it. Then in-place ops are turned off (a shortcut must
never read a tensor an in-place op overwrote) and shapes are recorded by
running the graph once, with real tensors or, with ``fake=True``, FakeTensors.

Leaf policy: fx keeps ``torch.nn`` modules, our ``Shortcut`` and whatever the
user names (``leaf_modules`` globs, ``--leaf``) opaque; when timm is imported,
the modules and functions it registers as not traceable are added.
"""

from __future__ import annotations

import copy
import inspect
import fnmatch
import operator
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import fx
from torch.utils import _pytree as pytree

from .errors import ConfigError, ShapeError, TraceError, brief
from .quiet import quiet_torch
from .inplace import input_dependent, remove_inplace
from .shapes import META, propagate_shapes, runs

__all__ = ["trace_model", "propagate_shapes", "remove_inplace", "graph_module_from_export",
           "default_leaf_modules", "normalize_inputs", "META"]

aten = torch.ops.aten


def trace_model(model: nn.Module, example_inputs: tuple, *,
                leaf_modules: Iterable[str] = (), concrete_args: dict | None = None,
                fake: bool = False, dynamic_batch: bool = True) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule annotated with shapes; the model is not modified.

    Args:
        model: the network to trace (it is deep-copied first).
        example_inputs: tuple of tensors, as for torch.export.
        leaf_modules: glob patterns on module names or class names that fx should
            keep opaque (call them, do not trace inside). ``default_leaf_modules()``
            is always added.
        concrete_args: values for non-tensor ``forward`` arguments (flags, modes),
            baked into the graph, as for ``torch.fx.symbolic_trace``.
        fake: record shapes with FakeTensors (no activation memory, no arithmetic)
            instead of running the graph; see ``propagate_shapes``.
        dynamic_batch: when the torch.export fallback runs, mark dim 0 of every
            input dynamic (``torch.export.Dim.AUTO``) so the graph accepts other
            batch sizes; export keeps it static where the model needs that.

    Returns:
        A GraphModule whose nodes carry ``node.meta["ressurgeon"]`` with ``shape``,
        ``dtype`` and ``device`` for tensor values; ``gm.meta["ressurgeon"]["method"]``
        says "fx", "export", or "graph" (the model was a GraphModule already).

    Raises:
        TraceError: neither fx nor torch.export could capture the model; names the
            module and the source line where fx stopped.
        ShapeError: the model rejects the example inputs (names the layer).

    Example:
        >>> gm = trace_model(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> [n.meta["ressurgeon"]["shape"] for n in gm.graph.nodes if n.op == "call_module"]
        [(3, 2)]
    """
    inputs = normalize_inputs(example_inputs)
    _check_concrete(model, concrete_args)
    _check_arity(model, inputs, concrete_args)
    with warnings.catch_warnings():
        # exported graphs carry pytree specs whose deepcopy warns about torch internals
        warnings.simplefilter("ignore", FutureWarning)
        work = copy.deepcopy(model)
    leaves = tuple(leaf_modules)
    if isinstance(work, fx.GraphModule):
        # Already a graph (a loaded .pt2, an earlier trace): keep its nodes and
        # their metadata instead of tracing generated code again.
        if isinstance(work.graph._codegen, fx.graph._PyTreeCodeGen):
            work = plain_graph_module(work)
        gm, method, fx_error = work, "graph", None
    else:
        try:
            gm = _trace_fx(work, leaves, concrete_args)
            method, fx_error = "fx", None
        except Exception as exc:  # fx raises many kinds of errors for untraceable code
            gm, method, fx_error = None, None, exc
    if gm is not None:
        remove_inplace(gm)
        try:
            propagate_shapes(gm, inputs, fake=fake)
        except ShapeError as shape_error:
            # fx can trace code it then cannot run (shape-dependent Python);
            # only a model that runs as it is deserves the export fallback.
            if not runs(model, inputs, fake=fake):
                raise
            gm, fx_error = None, shape_error
    if gm is None:
        gm = _trace_export(work, inputs, fx_error, dynamic_batch)
        method = "export"
        remove_inplace(gm)
        propagate_shapes(gm, inputs, fake=fake)
    gm.meta.setdefault(META, {})["method"] = method
    if fx_error is not None:
        gm.meta[META]["fx_error"] = _describe_fx_failure(fx_error)
    gm.train(model.training)
    return gm


def _check_arity(model: nn.Module, inputs: tuple, concrete_args: dict | None) -> None:
    """As many example inputs as ``forward`` takes tensors (fx would silently drop extras)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in kinds and p.name not in (concrete_args or {})]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if not len(required) <= len(inputs) <= len(positional):
        names = ", ".join(p.name for p in positional) or "none"
        want = (str(len(required)) if len(required) == len(positional)
                else f"{len(required)} to {len(positional)}")
        raise ShapeError(f"{type(model).__name__}.forward takes {want} tensor input(s) ({names}); "
                         f"{len(inputs)} example input(s) were given: pass one --input-shape "
                         "per input")


def _check_concrete(model: nn.Module, concrete_args: dict | None) -> None:
    """Every concrete arg must name a parameter of ``forward`` (a typo would be ignored by fx)."""
    if not concrete_args:
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(concrete_args) - set(params))
    if unknown:
        raise ConfigError(f"concrete arg(s) {', '.join(unknown)} are not parameters of "
                          f"{type(model).__name__}.forward ({', '.join(params) or 'none'})")


def normalize_inputs(example_inputs) -> tuple:
    """Accept a tensor or a tuple/list of tensors; return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ShapeError("example_inputs must be a non-empty tuple of tensors, "
                         f"got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"example input {i} is a {type(t).__name__}, not a tensor; "
                             "pass tensors only (as for torch.export)")
    return tuple(example_inputs)


def default_leaf_modules() -> tuple[tuple[type, ...], tuple]:
    """(module classes, functions) that tracing keeps opaque without being asked.

    When timm is imported, the modules and functions it registers as not
    fx-traceable (``timm.layers.register_notrace_module`` / ``_function``) are
    used, as timm's own feature extraction does. Nothing else is needed for
    torch and torchvision: fx already keeps ``torch.nn`` modules opaque, and
    torchvision wraps its untraceable functions with ``torch.fx.wrap``.

    Returns:
        A tuple of classes and a tuple of functions (both empty without timm).

    Example:
        >>> classes, functions = default_leaf_modules()
    """
    timm = sys.modules.get("timm")  # only if the user imported it: never import timm here
    if timm is None:
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
        return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())
    except (ImportError, AttributeError):
        return (), ()


class _LeafTracer(fx.Tracer):
    """fx tracer that also keeps user-named modules and our own shortcuts opaque."""

    def __init__(self, leaves: tuple[str, ...] = (),  # default: unpickling re-creates it
                 leaf_classes: tuple[type, ...] = (), autowrap_functions: tuple = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaves = leaves
        self.leaf_classes = leaf_classes

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .shortcuts import Shortcut  # local: shortcuts imports nothing from here

        if isinstance(m, (Shortcut, *self.leaf_classes)):
            return True
        name = type(m).__name__
        if any(fnmatch.fnmatchcase(qualname, p) or fnmatch.fnmatchcase(name, p)
               for p in self.leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _trace_fx(model: nn.Module, leaves: tuple[str, ...],
              concrete_args: dict | None) -> fx.GraphModule:
    classes, functions = default_leaf_modules()
    tracer = _LeafTracer(leaves, classes, functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        # fx does not unwind its module stack on errors: its top is where tracing stopped
        stack = list(tracer.module_stack.values())
        exc._ressurgeon_module = stack[-1] if stack else ("", type(model))
        raise
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if concrete_args:
        _drop_concrete_placeholders(gm.graph, concrete_args)
        gm.recompile()
    return gm


def _drop_concrete_placeholders(graph: fx.Graph, concrete_args: dict) -> None:
    """fx keeps a placeholder and an assert for each concrete arg; the graph takes tensors only.

    The value is substituted for the placeholder, so the asserts become
    constant checks, and those are dropped with it.
    """
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        # fx renames the placeholder when the value equals the default ("flag_1")
        name = node.target if node.target in concrete_args else re.sub(r"_\d+$", "", node.target)
        if name in concrete_args:
            value = concrete_args[name]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs,
                                              lambda a, n=node, v=value: v if a is n else a)
            graph.erase_node(node)
    live = input_dependent(graph)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node not in live and not node.users and (
                getattr(node.target, "__name__", "") in ("_assert", "_assert_is_none")):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()



def _describe_fx_failure(exc: BaseException | None) -> str:
    """'<message>' plus the module being traced and the user's source line, when known."""
    text = brief(exc)
    where = []
    path, cls = getattr(exc, "_ressurgeon_module", ("", None))
    if cls is not None:
        where.append(f"in module '{path}' ({cls.__name__})" if path else
                     f"in {cls.__name__}.forward")
    site = _user_frame(exc)
    if site:
        where.append(f"at {site}")
    return f"{text} [{' '.join(where)}]" if where else text


def _user_frame(exc: BaseException | None) -> str:
    """'file.py:12 `code`' for the innermost traceback frame outside torch and ressurgeon."""
    if exc is None or exc.__traceback__ is None:
        return ""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(skip) and "<" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    code = f": {f.line.strip()}" if f.line else ""
    return f"{os.path.basename(f.filename)}:{f.lineno}{code}"


def _batch_dims(inputs: tuple) -> tuple:
    auto = torch.export.Dim.AUTO
    return tuple({0: auto} if t.dim() >= 1 else None for t in inputs)


def _trace_export(model: nn.Module, inputs: tuple, fx_error: Exception | None,
                  dynamic_batch: bool = True) -> fx.GraphModule:
    try:
        dims = _batch_dims(inputs) if dynamic_batch else None
        # export logs whole tracebacks before it raises, and on data-dependent
        # errors prints its partial graph to stderr
        with quiet_torch(stderr=True):
            ep = torch.export.export(model, inputs, dynamic_shapes=dims, strict=False)
    except Exception as exc:
        module = getattr(fx_error, "_ressurgeon_module", ("", None))[0]
        hint = f"(e.g. --leaf '{module}')" if module else "(leaf_modules / --leaf)"
        raise TraceError(
            f"cannot capture {type(model).__name__}: torch.fx failed with "
            f"'{_describe_fx_failure(fx_error)}' and torch.export with '{brief(exc)}'"
            f"{' at ' + _user_frame(exc) if _user_frame(exc) else ''}. "
            f"Mark the offending submodule as a leaf {hint} or rewrite "
            "the data-dependent Python branch with torch.where / torch.cond"
        ) from exc
    return graph_module_from_export(ep)


def graph_module_from_export(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """A plain, trainable GraphModule from an ExportedProgram.

    ``ep.module()`` refuses ``.train()`` and bakes the capture-time mode into
    batch_norm and dropout. We take its graph, drop the pytree calling
    convention and input guards, and turn those ops back into nn.BatchNorm /
    nn.Dropout modules that own the same tensors and follow ``.train()``.
    """
    return plain_graph_module(ep.module())


def plain_graph_module(unlifted: fx.GraphModule) -> fx.GraphModule:
    """The conversion behind ``graph_module_from_export``, for an ``ep.module()`` result.

    The graph object is taken over, not copied: pass a module you own.
    """
    out_spec = getattr(unlifted, "_out_spec", None)
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="ExportedModel")
    # A dynamic-shape export leaves its ShapeEnv behind: unpicklable, and not
    # needed once the graph runs on real tensors (it lives on in node.meta["val"]).
    for attr in ("shape_env", "_in_spec", "_out_spec"):
        gm.__dict__.pop(attr, None)  # the pytree specs only warn on deepcopy once unused
    # Unpickling re-traces the generated code with the graph's tracer class;
    # export's needs constructor arguments, the plain fx Tracer does not.
    gm._tracer_cls, gm._tracer_extras, gm.graph._tracer_cls = None, {}, None
    graph = gm.graph
    graph.set_codegen(fx.graph.CodeGen())
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            target = str(node.target)
            graph.erase_node(node)
            gm.delete_submodule(target)  # a local function inside: it would block pickling
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    if out_spec is not None and isinstance(flat, (tuple, list)):
        output.args = (pytree.tree_unflatten(list(flat), out_spec),)
    _modules_from_mode_ops(gm)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _modules_from_mode_ops(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            _replace_batch_norm(gm, node)
        elif node.target in (aten.dropout.default, aten.feature_dropout.default):
            x, p = node.args[0], node.args[1]
            dims = len(x.meta["val"].shape) if "val" in x.meta else 2
            cls = nn.Dropout if node.target is aten.dropout.default else (
                {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}.get(dims, nn.Dropout))
            _swap_for_module(gm, node, cls(p), (x,), stack_path(node) or "dropout")
    # BN's num_batches_tracked increment is part of the BatchNorm module now.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.add_.Tensor and not node.users:
            target = node.args[0]
            if target.op == "get_attr" and str(target.target).endswith("num_batches_tracked"):
                graph.erase_node(node)


def _replace_batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    x, weight, bias, mean, var = node.args[:5]
    if node.target is aten.batch_norm.default:
        momentum, eps = node.args[6], node.args[7]
    else:
        momentum, eps = node.args[5], node.args[6]
    tensors = {name: (gm.get_parameter(a.target) if name in ("weight", "bias")
                      else gm.get_buffer(a.target)) if isinstance(a, fx.Node) else None
               for name, a in (("weight", weight), ("bias", bias),
                               ("running_mean", mean), ("running_var", var))}
    rank = len(x.meta["val"].shape)
    channels = x.meta["val"].shape[1]
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    bn = cls(int(channels), eps=eps, momentum=momentum,
             affine=tensors["weight"] is not None,
             track_running_stats=tensors["running_mean"] is not None)
    for name, t in tensors.items():
        if t is not None:
            setattr(bn, name, t)  # the very same Parameter / buffer: no copy
    path = None
    for a in (weight, bias, mean, var):
        if isinstance(a, fx.Node) and "." in str(a.target):
            path = str(a.target).rsplit(".", 1)[0]
            break
    if path is not None and tensors["running_mean"] is not None:
        counter = f"{path}.num_batches_tracked"
        try:
            bn.num_batches_tracked = gm.get_buffer(counter)
        except AttributeError:
            pass
    user = node
    if node.target is not aten.batch_norm.default:  # returns a tuple: use its item 0
        items = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(items) != 1 or len(node.users) != 1:
            return
        user = items[0]
    _swap_for_module(gm, user, bn, (x,), path or stack_path(node) or "batch_norm",
                     replace_existing=path is not None)
    if user is not node:
        gm.graph.erase_node(node)


def _swap_for_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple,
                     path: str, replace_existing: bool = False) -> None:
    if not replace_existing:
        path = free_name(gm, path)
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def free_name(gm: nn.Module, path: str) -> str:
    """``path``, or ``path_1``, ``path_2``... whichever names no attribute of gm yet."""
    candidate, i = path, 1
    while _taken(gm, candidate):
        candidate, i = f"{path}_{i}", i + 1
    return candidate


def _taken(gm: nn.Module, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return False
    return hasattr(owner, leaf)


def stack_path(node: fx.Node) -> str | None:
    """The module path torch.export recorded for a node (``nn_module_stack``), if any."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or None
    return None


def node_label(node: fx.Node) -> str:
    """A readable name: the module path for module calls and exported ops, else the node name."""
    if node.op == "call_module":
        return str(node.target)
    return stack_path(node) or node.name


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'Conv2d' for a module call, 'conv2d' for an aten op, the function's name otherwise."""
    if node.op == "call_module" and node.target in modules:
        return type(modules[node.target]).__name__
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))
