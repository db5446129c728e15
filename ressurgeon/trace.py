"""Stage 2, trace: module + example inputs -> GraphModule with shapes in node.meta.

torch.fx ``symbolic_trace`` first, because it keeps the user's modules (a
BatchNorm stays a BatchNorm and trains like one). When fx cannot follow the
model (Python control flow on tensors or shapes), torch.export captures it
and ``graph_module_from_export`` turns mode-dependent ops back into modules so
the result still trains like the original. Then in-place ops are turned off
(a shortcut must never read a tensor an in-place op overwrote) and shapes are
recorded by running the graph once.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import operator
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import fx
from torch.utils import _pytree as pytree

from .errors import ShapeError, TraceError, brief

META = "ressurgeon"  # our annotations live in node.meta[META] and gm.meta[META]
aten = torch.ops.aten


def trace_model(model: nn.Module, example_inputs: tuple, *,
                leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule annotated with shapes; the model is not modified.

    Args:
        model: the network to trace (it is deep-copied first).
        example_inputs: tuple of tensors, as for torch.export.
        leaf_modules: glob patterns on module names or class names that fx should
            keep opaque (call them, do not trace inside).

    Returns:
        A GraphModule whose nodes carry ``node.meta["ressurgeon"]`` with ``shape``,
        ``dtype`` and ``device`` for tensor values; ``gm.meta["ressurgeon"]["method"]``
        says "fx", "export", or "graph" (the model was a GraphModule already).

    Raises:
        TraceError: neither fx nor torch.export could capture the model.
        ShapeError: the model rejects the example inputs (names the layer).

    Example:
        >>> gm = trace_model(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> [n.meta["ressurgeon"]["shape"] for n in gm.graph.nodes if n.op == "call_module"]
        [(3, 2)]
    """
    inputs = normalize_inputs(example_inputs)
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
            gm = _trace_fx(work, leaves)
            method, fx_error = "fx", None
        except Exception as exc:  # fx raises many kinds of errors for untraceable code
            gm, method, fx_error = None, None, exc
    if gm is not None:
        remove_inplace(gm)
        try:
            propagate_shapes(gm, inputs)
        except ShapeError as shape_error:
            # fx can trace code it then cannot run (shape-dependent Python);
            # only a model that runs as it is deserves the export fallback.
            if not _runs(model, inputs):
                raise
            gm, fx_error = None, shape_error
    if gm is None:
        gm = _trace_export(work, inputs, fx_error)
        method = "export"
        remove_inplace(gm)
        propagate_shapes(gm, inputs)
    gm.meta.setdefault(META, {})["method"] = method
    if fx_error is not None:
        gm.meta[META]["fx_error"] = brief(fx_error)
    gm.train(model.training)
    return gm


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


class _LeafTracer(fx.Tracer):
    """fx tracer that also keeps user-named modules and our own shortcuts opaque."""

    def __init__(self, leaves: tuple[str, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .shortcuts import Shortcut  # local: shortcuts imports nothing from here

        if isinstance(m, Shortcut):
            return True
        name = type(m).__name__
        if any(fnmatch.fnmatchcase(qualname, p) or fnmatch.fnmatchcase(name, p)
               for p in self.leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _trace_fx(model: nn.Module, leaves: tuple[str, ...]) -> fx.GraphModule:
    graph = _LeafTracer(leaves).trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _trace_export(model: nn.Module, inputs: tuple, fx_error: Exception | None) -> fx.GraphModule:
    export_logger = logging.getLogger("torch.export")
    level = export_logger.level
    export_logger.setLevel(logging.CRITICAL)  # export logs whole tracebacks before raising
    try:
        ep = torch.export.export(model, inputs, strict=False)
    except Exception as exc:
        raise TraceError(
            f"cannot capture {type(model).__name__}: torch.fx failed with "
            f"'{brief(fx_error)}' and torch.export with '{brief(exc)}'. "
            "Mark the offending submodule as a leaf (leaf_modules / --leaf) or rewrite "
            "the data-dependent Python branch with torch.where / torch.cond"
        ) from exc
    finally:
        export_logger.setLevel(level)
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
    graph = gm.graph
    graph.set_codegen(fx.graph.CodeGen())
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)
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
            _swap_for_module(gm, node, cls(p), (x,), _stack_path(node) or "dropout")
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
    _swap_for_module(gm, user, bn, (x,), path or _stack_path(node) or "batch_norm",
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


def _stack_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or None
    return None


def node_label(node: fx.Node) -> str:
    """A readable name: the module path for module calls and exported ops, else the node name."""
    if node.op == "call_module":
        return str(node.target)
    return _stack_path(node) or node.name


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'Conv2d' for a module call, 'conv2d' for an aten op, the function's name otherwise."""
    if node.op == "call_module" and node.target in modules:
        return type(modules[node.target]).__name__
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


# -- in-place ops --------------------------------------------------------------------

def remove_inplace(gm: fx.GraphModule) -> int:
    """Turn in-place ops on activations into their out-of-place forms; return how many.

    Later readers of a tensor that an in-place op overwrote are rewired to the
    op's result, so the function stays exactly the same while no tensor is
    overwritten behind a shortcut's back. Module flags (``ReLU(inplace=True)``),
    call arguments (``F.relu(x, inplace=True)``), ``x.relu_()`` methods and
    ``torch.relu_`` / aten ``relu_`` functions are all covered. In-place updates
    of buffers (counters, running statistics) are state, not activations, and
    are left alone.
    """
    graph = gm.graph
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(graph.nodes)}
    from_input = _input_dependent(graph)
    changed = 0
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] not in from_input:
            continue
        mutated = _make_out_of_place(node, modules)
        if mutated is None:
            continue
        changed += 1
        for user in list(mutated.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(mutated, node)
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _make_out_of_place(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """Edit one node to its out-of-place form; return the tensor it used to overwrite."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            return node.args[0]
        return None
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            node.target = name[:-1]
            return node.args[0]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            return node.args[0]
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if not target._schema.is_mutable:
            return None
        base = target.overloadpacket.__name__
        if not base.endswith("_"):
            return None
        packet = getattr(aten, base[:-1], None)
        if packet is None or target._overloadname not in packet.overloads():
            return None
        node.target = getattr(packet, target._overloadname)
        return node.args[0]
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and target is getattr(torch, name, None):
        outplace = getattr(torch, name[:-1], None)
        if outplace is not None:
            node.target = outplace
            return node.args[0]
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return node.args[0]
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" in params:
        i = params.index("inplace")
        if i < len(node.args) and node.args[i] is True:
            node.args = node.args[:i] + (False,) + node.args[i + 1:]
            return node.args[0]
    return None


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


# -- shapes -----------------------------------------------------------------------------

class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and writes each value's shape, dtype and device into node.meta."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our ShapeError already names the node

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ShapeError(_shape_message(self.module, n, self.env, exc)) from exc
        info = n.meta.setdefault(META, {})
        if isinstance(result, torch.Tensor):
            info.update(shape=tuple(result.shape), dtype=result.dtype, device=result.device)
        else:
            for key in ("shape", "dtype", "device"):
                info.pop(key, None)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record shape/dtype/device of every tensor in ``node.meta["ressurgeon"]`` (eval mode)."""
    was_training = gm.training
    gm.eval()  # no running-stat updates; BN accepts batch 1
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    finally:
        gm.train(was_training)


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether the untouched model accepts the inputs (a failure is the user's shape)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:
        return False
    finally:
        model.train(was_training)


def _shape_message(gm: fx.GraphModule, node: fx.Node, env: dict, exc: Exception) -> str:
    shapes = [tuple(env[a].shape) for a in node.all_input_nodes
              if a.op != "get_attr" and isinstance(env.get(a), torch.Tensor)]
    shown = ", ".join(str(s) for s in shapes) or "no tensor"
    if node.op == "call_module":
        what = f"layer '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    else:
        what = f"layer '{node_label(node)}' ({op_name(node, {})})"
    return (f"{what} rejected input of shape {shown}: {brief(exc)}; "
            "check the example input shape (--input-shape)")
