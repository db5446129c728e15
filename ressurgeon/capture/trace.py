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

import fnmatch
from dataclasses import replace
import inspect
import os
import re
import sys
import traceback
import torch
import torch.nn as nn
from torch import fx

from .._fx import META, CaptureInfo, capture_info, input_dependent
from .._torch import normalize_inputs, quiet_copy, quiet_torch
from ..config import TraceOptions
from ..errors import ConfigError, ShapeError, TraceError, brief
from .exported import (as_module, dynamic_args, graph_module_from_export, is_unlifted,
                       plain_graph_module)
from ..load.record import ModelRecord, record_of
from .inplace import remove_inplace
from .modes import flipped_mode, keeps_mode, modules_for_mode_calls, reads_mode
from ..recurrent import packed_call, refuse_packed, split_recurrent
from .shapes import inputs_message, propagate_shapes, run_error
from ..shortcuts import is_shortcut

__all__ = ["trace_model", "default_leaf_modules"]


def trace_model(model: nn.Module, example_inputs: tuple,
                options: TraceOptions | None = None) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule annotated with shapes; the model is not modified.

    A Hugging Face transformers model is captured with ``use_cache=False`` (set
    on the copy; ``hf.py`` has the rule), and its ModelOutput comes back as a dict.

    Args:
        model: the network to trace (it is deep-copied first), or its
            ``ModelRecord`` (whose ``prepare`` is applied to the copy). An
            ExportedProgram's ``.module()`` or a GraphModule is taken as the graph
            it already is.
        example_inputs: tuple of tensors, as for torch.export.
        options: TraceOptions: ``leaf_modules`` (globs on module or class names
            fx keeps opaque; ``default_leaf_modules()`` is always added),
            ``concrete_args`` (non-tensor forward arguments, baked in by fx and
            by the export fallback alike), ``fake`` (record
            shapes with FakeTensors), ``dynamic_batch`` (the export fallback keeps
            the batch symbolic).

    Returns:
        A GraphModule whose nodes carry a ``NodeInfo`` in ``node.meta["ressurgeon"]``
        (shape, dtype, device for tensor values); ``capture_info(gm).method`` says
        "fx", "export", or "graph" (the model was a GraphModule already).

    Raises:
        TraceError: neither fx nor torch.export could capture the model; names the
            module and the source line where fx stopped.
        ShapeError: the model rejects the example inputs (names the layer).

    Example:
        >>> gm = trace_model(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> from ressurgeon._fx import shape_of
        >>> [shape_of(n) for n in gm.graph.nodes if n.op == "call_function"]
        [(3, 2)]
    """
    options = options or TraceOptions()
    inputs = normalize_inputs(example_inputs)
    record = model if isinstance(model, ModelRecord) else record_of(as_module(model))
    model = record.module
    concrete = options.concrete_args
    _check_concrete(model, concrete)
    _check_arity(model, inputs, concrete)
    _check_dynamic(model, inputs, options.dynamic)
    work = quiet_copy(model)
    if record.prepare is not None:  # Hugging Face models: a KV cache is no tensor (see hf.py)
        record.prepare(work)
    if options.split_recurrent and not isinstance(work, fx.GraphModule):
        work = split_recurrent(work)  # exact; lets shortcuts go between an LSTM's layers
    fx_error: _FxFailure | ShapeError | None = None
    if isinstance(work, fx.GraphModule):
        # Already a graph (a loaded .pt2, an earlier trace): keep its nodes and
        # their metadata instead of tracing generated code again.
        gm, method = (plain_graph_module(work) if is_unlifted(work) else work), "graph"
    else:
        try:
            gm, method = _trace_fx(work, options), "fx"
        except _FxFailure as exc:  # fx raises many kinds of errors for untraceable code
            packing = packed_call(exc.error)
            if packing is not None:  # torch.export fails there too, less clearly
                raise refuse_packed(model, packing, _user_frame(exc.error)) from exc
            gm, method, fx_error = None, None, exc
    if gm is not None:
        remove_inplace(gm)
        try:
            propagate_shapes(gm, inputs, fake=options.fake)
        except ShapeError as shape_error:
            # fx can trace code it then cannot run (shape-dependent Python);
            # only a model that runs as it is deserves the export fallback.
            if run_error(model, inputs, fake=options.fake) is not None:
                raise
            gm, fx_error = None, shape_error
    if gm is None:
        rejected = run_error(model, inputs, fake=options.fake)
        if rejected is not None:  # no capture method helps: say what is wrong with the inputs
            raise ShapeError(inputs_message(model, inputs, rejected)) from rejected
        gm, method = _trace_export(work, inputs, fx_error, options), "export"
        export_baked = _export_mode_diff(work, inputs, fx_error, options, gm)
        remove_inplace(gm)
        propagate_shapes(gm, inputs, fake=options.fake)
    captured = capture_info(gm) if method in ("export", "graph", "fx") else CaptureInfo(method)
    gm.meta[META] = CaptureInfo(method=method, fx_error=None if fx_error is None
                                else _describe_fx_failure(fx_error),
                                dynamic=captured.dynamic if method != "fx" else None,
                                ranges=captured.ranges, mode_baked=captured.mode_baked)
    if method == "export":  # its BatchNorm/Dropout modules are new: they follow the model
        gm.train(model.training)
        baked = tuple(dict.fromkeys((*(name for name, m in model.named_modules()
                                         if name and keeps_mode(m)), *export_baked)))
        gm.meta[META] = replace(gm.meta[META], mode_baked=baked)
    else:  # the copy's submodules keep their own modes (frozen BatchNorm stays frozen)
        gm.training = model.training
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


def _check_dynamic(model: nn.Module, inputs: tuple,
                   dynamic: tuple[tuple[int | None, int], ...]) -> None:
    """Every dim asked dynamic exists, and a graph exported with it fixed is not asked for it.

    Raises:
        ConfigError: names the flag, the inputs' ranks or the size the graph fixed.
    """
    captured = capture_info(model).dynamic if isinstance(model, fx.GraphModule) else None
    ranks = ", ".join(f"input {i}: {t.dim()}" for i, t in enumerate(inputs))
    for index, dim in dynamic:
        flag = f"--dynamic {dim}" if index is None else f"--dynamic {index}:{dim}"
        if index is not None and not 0 <= index < len(inputs):
            raise ConfigError(f"{flag}: there is no input {index}; the model takes "
                              f"{len(inputs)} input(s), numbered from 0")
        matched = [(i, dim % t.dim()) for i, t in enumerate(inputs)
                   if (index is None or index == i) and -t.dim() <= dim < t.dim()]
        if not matched:
            who = "no input has" if index is None else f"input {index} has no"
            raise ConfigError(f"{flag}: {who} dim {dim} (dims per input: {ranks})")
        if captured is not None:
            fixed = [(i, d) for i, d in matched if (i, d) not in captured]
            if fixed and len(fixed) == len(matched):
                i, d = fixed[0]
                raise ConfigError(
                    f"{flag}: this graph was exported by torch.export with input {i} dim {d} "
                    f"fixed at size {inputs[i].shape[d]}, and ressurgeon cannot make a captured "
                    "dim dynamic; export the model again with a torch.export.Dim for that dim "
                    "(dynamic_shapes), or drop --dynamic")


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
        if is_shortcut(m) or isinstance(m, self.leaf_classes) or keeps_mode(m):
            return True
        name = type(m).__name__
        if any(fnmatch.fnmatchcase(qualname, p) or fnmatch.fnmatchcase(name, p)
               for p in self.leaves):
            return True
        return super().is_leaf_module(m, qualname)


class _FxFailure(Exception):
    """fx could not trace the model; ``module`` is (path, class) where it stopped."""

    def __init__(self, error: BaseException, module: tuple[str, type | None]):
        super().__init__(str(error))
        self.error, self.module = error, module


def _trace_fx(model: nn.Module, options: TraceOptions) -> fx.GraphModule:
    """fx's trace; a model whose own code reads ``self.training`` is traced in both modes.

    The second trace finds the functional dropouts that follow the mode (they
    become modules) and the modules whose behaviour the capture mode fixed
    (``CaptureInfo.mode_baked``; see ``modes.py``).
    """
    gm = _trace_fx_once(model, options)
    baked: tuple[str, ...] = ()
    if reads_mode(model):
        with flipped_mode(model) as other_training:
            try:
                other = _trace_fx_once(model, options)
            except _FxFailure:  # the other branch cannot be traced: its modules are fixed
                other = None
        baked = (("(the model)",) if other is None
                 else modules_for_mode_calls(gm, other, other_training))
    gm.meta[META] = CaptureInfo(method="fx", mode_baked=baked)
    return gm


def _trace_fx_once(model: nn.Module, options: TraceOptions) -> fx.GraphModule:
    classes, functions = default_leaf_modules()
    tracer = _LeafTracer(options.leaf_modules, classes, functions)
    try:
        graph = tracer.trace(model, concrete_args=options.concrete_args)
    except Exception as exc:
        # fx does not unwind its module stack on errors: its top is where tracing stopped
        stack = list(tracer.module_stack.values())
        raise _FxFailure(exc, stack[-1] if stack else ("", type(model))) from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if options.concrete_args:
        _drop_concrete_placeholders(gm.graph, options.concrete_args)
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
    where = []
    if isinstance(exc, _FxFailure):
        path, cls = exc.module
        exc = exc.error
        if cls is not None:
            where.append(f"in module '{path}' ({cls.__name__})" if path else
                         f"in {cls.__name__}.forward")
    site = _user_frame(exc)
    if site:
        where.append(f"at {site}")
    text = brief(exc)
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


def _export_mode_diff(model: nn.Module, inputs: tuple, fx_error: BaseException | None,
                      options: TraceOptions, gm: fx.GraphModule) -> tuple[str, ...]:
    """Modules whose exported graph differs between train and eval: export fixed their mode.

    torch.export inlines every forward, so a layer with weights whose own code
    reads ``self.training`` (GPT-2's attention passes ``dropout_p`` only in
    train mode) keeps the capture's mode without a trace of it in the graph.
    When some module reads the mode, the model is exported once more in the
    other mode and the two graphs are compared (``modes.modules_for_mode_calls``:
    functional dropouts become modules, anything else is named).
    """
    if not reads_mode(model):
        return ()
    with flipped_mode(model) as other_training:
        try:
            other = _trace_export(model, inputs, fx_error, options)
        except Exception:  # the other mode does not export: all of it is fixed
            return ("(the model)",)
    return modules_for_mode_calls(gm, other, other_training)


def _trace_export(model: nn.Module, inputs: tuple, fx_error: BaseException | None,
                  options: TraceOptions) -> fx.GraphModule:
    """torch.export, with the batch symbolic where the model allows it (see exported.py).

    Dims the user asked to keep dynamic are never quietly fixed: if export cannot
    keep them symbolic, the error says so. Concrete args are passed as keyword
    arguments and baked in, as fx bakes them in.
    """
    attempts = []
    if options.dynamic_batch or options.dynamic:
        attempts.append(dynamic_args(inputs, batch=options.dynamic_batch, dims=options.dynamic))
    if options.dynamic:
        attempts.append(dynamic_args(inputs, batch=False, dims=options.dynamic))
    elif not attempts or attempts[0][1] is not None:
        attempts.append((inputs, None))  # the model may pin its batch: capture it static
    error, output = None, None
    concrete = options.concrete_args or {}
    for args, dims in attempts:
        if dims is not None:  # one entry per argument, the concrete kwargs included
            dims = tuple(dims) + (None,) * len(concrete)
        try:
            # export logs whole tracebacks before it raises, and on data-dependent
            # errors prints its partial graph to stderr
            with quiet_torch(stderr=True):
                ep = torch.export.export(model, args, kwargs=concrete, dynamic_shapes=dims,
                                         strict=False)
            gm = graph_module_from_export(ep)
            if concrete:  # baked in, as fx does: the graph takes the tensors only
                _drop_concrete_placeholders(gm.graph, concrete)
                gm.recompile()
            return gm
        except Exception as exc:
            error = error or exc
            output = output or _unsupported_output(exc)
    if output is not None:  # the advice below is about control flow; this is not that
        raise TraceError(f"cannot capture {type(model).__name__}: {output}") from error
    if options.dynamic and fx_error is not None:
        asked = ", ".join(f"{'every input' if i is None else f'input {i}'} dim {d}"
                          for i, d in options.dynamic)
        raise TraceError(f"torch.export cannot keep {asked} dynamic for "
                         f"{type(model).__name__}: {brief(error)}; drop --dynamic for that dim "
                         "(the graph then accepts only the example's size there)") from error
    module = fx_error.module[0] if isinstance(fx_error, _FxFailure) else ""
    hint = f"(e.g. --leaf '{module}')" if module else "(leaf_modules / --leaf)"
    where = _user_frame(error)
    children = [name for name, _ in model.named_children()]
    pick = _likely_body(model)
    part = (f"; or rewrite only a submodule that traces: --module {pick} (SkipConfig("
            f"module={pick!r})); its children: {', '.join(children[:8])}" if children else "")
    raise TraceError(
        f"cannot capture {type(model).__name__}: torch.fx failed with "
        f"'{_describe_fx_failure(fx_error)}' and torch.export with '{brief(error)}'"
        f"{' at ' + where if where else ''}. "
        f"Mark the offending submodule as a leaf {hint} or rewrite "
        f"the data-dependent Python branch with torch.where / torch.cond{part}"
    ) from error


BODY_NAMES = ("backbone", "encoder", "features", "body", "model", "transformer")


def _likely_body(model: nn.Module) -> str:
    """The child to suggest for ``--module``: a usual name for a network's body (a
    detector's ``backbone``), else the child holding the most parameters."""
    children = dict(model.named_children())
    for name in BODY_NAMES:
        if name in children:
            return name
    return max(children, key=lambda n: sum(p.numel() for p in children[n].parameters()))


def _unsupported_output(error: BaseException | None) -> str | None:
    """Why torch.export refused the model's return value, with the fix; None for other errors."""
    match = re.search(r"Found <class '([\w.]+)'> in output", str(error or ""))
    if match is None:
        return None
    cls = match[1]
    if cls.rsplit(".", 1)[-1].endswith("Cache"):
        return (f"it returns a {cls} (a key/value cache for generation), which torch.export "
                "cannot carry; pass use_cache=False (from Python: model.config.use_cache = "
                "False, or TraceOptions(concrete_args={'use_cache': False}); on the command "
                "line --concrete use_cache=False) or make forward return tensors")
    return (f"it returns a {cls}, which torch.export cannot carry (not a tensor, nor a type "
            "registered with torch.utils._pytree); make forward return tensors, or register "
            "the type with torch.utils._pytree.register_pytree_node")
