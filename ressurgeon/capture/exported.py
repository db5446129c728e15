"""torch.export plumbing: the arguments that make a capture dynamic, and a trainable graph back.

``ep.module()`` refuses ``.train()``, bakes the capture-time mode into
batch_norm and dropout, calls convolutions as aten ops on loose weights, and
inlines our shortcut modules into plain ops. ``graph_module_from_export``
undoes all of that: the result is a plain GraphModule whose BatchNorm and
Dropout are modules again (owning the same tensors, following ``.train()``),
whose convolutions and linears are Conv/Linear modules again
(``lift_weighted_ops``: fold edits their weights, concat widens them) and
whose shortcuts are our shortcut modules again.

This is the one module that touches torch.export's private surface
(``_PyTreeCodeGen``, the tracer class of an unlifted graph, its guard
module): a torch upgrade that moves those is fixed here.

The dynamic-shape policy lives here too, one rule for every capture and
export (``dynamic_args``): dim 0 of each input batched like the first input
(same size) is the symbolic ``batch`` dimension; the dims a user marks dynamic
(``TraceOptions.dynamic``, ``--dynamic``) must stay symbolic; a dynamic dim of
size 1 is captured at size 2 (export specialises size 1); where the model pins
its batch, the capture is static.

A graph torch.export captured computes only the sizes it was captured with
for its static dims, and for its dynamic dims only the range the capture
allowed (``Dim(min=, max=)`` and what the model's code implied) and the sizes
that pass its guards (``bounds.py`` reads both as data).
``graph_module_from_export`` therefore puts a guard on each input
(``check_input``) and one on the guards (``check_guards``) that raise a
ShapeError naming the dim, the bound and the size instead of returning a wrong
result for another size.

A ``.pt2`` holds no train/eval flag: the graph's mode-dependent ops say in which
mode it was captured (``captured_training``), and the GraphModule starts in it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx
from torch.utils import _pytree as pytree

from .._fx import META, CaptureInfo
from .bounds import (check_guards, guard_texts, input_ranges, placeholder_keys,
                     shared_size_guards)
from ..errors import ShapeError
from ..recurrent import captured_recurrent
from ..shortcuts import lift_shortcuts
from .lift import _modules_from_mode_ops, lift_weighted_ops  # noqa: F401 (fold imports it here)

aten = torch.ops.aten


def batched_dims(inputs: tuple) -> list[bool]:
    """Which inputs get a symbolic batch dim 0: those batched like the first input."""
    if not inputs or inputs[0].dim() == 0:
        return [False] * len(inputs)
    batch = inputs[0].shape[0]
    return [t.dim() > 0 and t.shape[0] == batch for t in inputs]


def dynamic_dims(inputs: tuple, *, batch: bool = True,
                 dims: tuple[tuple[int | None, int], ...] = ()) -> list[set[int]]:
    """Per input, the dims to keep symbolic: the batch (dim 0 of batched inputs) and ``dims``.

    ``dims`` holds (input index, dim) pairs; an index of None means every input
    that has that dim. Negative dims count from the end.
    """
    out = [set() for _ in inputs]
    for i, on in enumerate(batched_dims(inputs) if batch else [False] * len(inputs)):
        if on:
            out[i].add(0)
    for index, dim in dims:
        for i, t in enumerate(inputs):
            if (index is None or index == i) and -t.dim() <= dim < t.dim():
                out[i].add(dim % t.dim())
    return out


def dynamic_args(inputs: tuple, *, batch: bool = True,
                 dims: tuple[tuple[int | None, int], ...] = (),
                 ranges: tuple[tuple[int, int, int, int | None], ...] = ()
                 ) -> tuple[tuple, tuple | None]:
    """(inputs, dynamic_shapes) for torch.export / torch.onnx under the one policy.

    The batch is one named ``Dim("batch")`` shared by the batched inputs; the
    dims a user asked for are ``Dim.DYNAMIC`` (export fails rather than quietly
    fixing them). torch.export specialises a dimension of size 1, so such a dim
    is traced at size 2 instead (the model must treat its rows or positions
    alike, as any batched or sequence model does). ``dynamic_shapes`` is None
    when nothing is dynamic.

    ``ranges``: (input, dim, least, most) a capture recorded (``CaptureInfo.ranges``);
    such a dim is exported as ``Dim(min=least, max=most)`` (one Dim per range,
    shared by the batched inputs for the batch), so a written archive keeps them.
    """
    wanted = dynamic_dims(inputs, batch=batch, dims=dims)
    if not any(wanted):
        return tuple(inputs), None
    # fresh tensor objects: export records dynamic dims on the example tensors it is given
    inputs = tuple(t.detach() for t in inputs)
    grown = []
    for t, free in zip(inputs, wanted):
        for d in sorted(free):
            if t.shape[d] == 1:
                t = t.expand(*[2 if i == d else -1 for i in range(t.dim())]).clone()
        grown.append(t)
    # only ranges that bound something: an open one is Dim.DYNAMIC, as without ranges
    # (a range of one size is no Dim: export fixes it, as the graph's check does)
    known = {(i, d): (lo, hi) for i, d, lo, hi in ranges
             if (lo > 2 or hi is not None) and (hi is None or hi > max(lo, 1))}
    batch_range = next((known[(i, 0)] for i, b in enumerate(batched_dims(inputs) if batch else [])
                        if b and (i, 0) in known), (1, None))
    batch_dim = _dim("batch", *batch_range)
    batched = dynamic_dims(inputs, batch=batch)
    shapes = tuple({d: (batch_dim if d in b else _dim(f"d{i}_{d}", *known[(i, d)])
                        if (i, d) in known else torch.export.Dim.DYNAMIC) for d in sorted(f)}
                   or None for i, (f, b) in enumerate(zip(wanted, batched)))
    return tuple(grown), shapes


def _dim(name: str, least: int, most: int | None):
    # export refuses min=0/1 for a Dim it must keep symbolic: it specialises sizes 0 and 1
    least = max(least, 1)
    return (torch.export.Dim(name, min=least) if most is None
            else torch.export.Dim(name, min=least, max=max(most, least)))


def export_attempts(inputs: tuple, *, batch: bool = True,
                    dims: tuple[tuple[int | None, int], ...] = (),
                    ranges: tuple[tuple[int, int, int, int | None], ...] = ()
                    ) -> list[tuple[tuple, tuple | None]]:
    """(inputs, dynamic_shapes) to try in turn when saving: all dims, the batch only, static.

    For writing a model that is already captured: what stays dynamic is a
    convenience there, so a dim export cannot keep symbolic falls back to fixed
    (``save.export_program`` reports every such fallback). With ``ranges``
    (a capture's), the dims keep those ranges.
    """
    attempts, seen = [], set()
    for args in (dynamic_args(inputs, batch=batch, dims=dims, ranges=ranges),
                 dynamic_args(inputs, batch=batch, dims=dims),  # ranges left to the guards
                 dynamic_args(inputs, batch=False, dims=dims, ranges=ranges),
                 dynamic_args(inputs, batch=batch, ranges=ranges),
                 dynamic_args(inputs, batch=batch),
                 (tuple(t.detach() for t in inputs), None)):
        key = repr(args[1])
        if key not in seen:
            seen.add(key)
            attempts.append(args)
    return attempts


def pinned_batch(module: nn.Module) -> bool:
    """True for a torch.export capture whose batch is fixed (its inputs' dim 0 is not symbolic)."""
    from .._fx import capture_info

    if not isinstance(module, fx.GraphModule):
        return False
    dims = capture_info(module).dynamic
    return dims is not None and not any(d == 0 for _, d in dims)


def captured_dims(gm: fx.GraphModule) -> tuple[tuple[int, int], ...]:
    """(input, dim) pairs a torch.export graph keeps symbolic, read off its placeholders."""
    found = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):
                found.append((i, d))
    return tuple(found)


@torch.fx.wrap
def check_input(x, index: int, rank: int, static: tuple[tuple[int, int], ...],
                bounds: tuple[tuple[int, int], ...] = (), recurrent: str = ""):
    """``x`` itself, when it has the rank and sizes the graph was captured for.

    ``static``: (dim, size) pairs fixed at capture; ``bounds``: (dim, least,
    most) of dynamic dims (most None: unbounded), the range the capture allowed
    (outside it the captured graph may hold the wrong branch); graphs written
    before 0.x hold (dim, most) pairs, still read. ``recurrent``: the aten
    recurrent op the graph holds, if any (torch.export fixes its sequence length).

    Raises:
        ShapeError: naming the input, the dim, the bound and the size given.
    """
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() != rank:
        raise ShapeError(f"input {index} has {x.dim()} dims, but this graph was captured by "
                         f"torch.export with {rank}; give inputs of the captured rank")
    for dim, size in static:
        if x.shape[dim] != size:
            fix = ("a dynamic batch (TraceOptions(dynamic_batch=True), the default, unless the "
                   "model's code pins it)" if dim == 0 else
                   f"the dim dynamic (when ressurgeon captures the model: "
                   f"TraceOptions(dynamic=(({index}, {dim}),)) or --dynamic {index}:{dim}; "
                   "when you export it: a torch.export.Dim for that dim)")
            if recurrent:  # no option frees a recurrent layer's time dim in torch.export
                fix = (f"torch.fx instead (the graph holds {recurrent}, which torch.export "
                       "captures at one sequence length): add_skips on the nn.Module returns "
                       "a graph, and a .pt of it, that takes any length")
            raise ShapeError(
                f"input {index} has size {x.shape[dim]} at dim {dim}, but this graph was "
                f"captured by torch.export with size {size} there and computes only that size; "
                f"give that size, or capture the model with {fix}")
    for bound in bounds:
        dim, least, most = bound if len(bound) == 3 else (bound[0], 0, bound[1])
        size = x.shape[dim]
        if size < least or (most is not None and size > most):
            allowed = f"{least} to {most}" if most is not None else f"{least} or more"
            raise ShapeError(f"input {index} has size {size} at dim {dim}, but this graph was "
                             f"captured by torch.export for sizes {allowed} there (the "
                             f"{'lower' if size < least else 'upper'} bound is "
                             f"{least if size < least else most}; outside the range the "
                             "captured graph may compute something else); give a size in "
                             "that range, or capture the model again with a wider range")
    return x


def _guard_inputs(gm: fx.GraphModule, range_constraints: dict | None = None,
                  guards: tuple[str, ...] = (), keys: list[tuple] | None = None) -> None:
    """A check_input after every placeholder whose shape torch.export recorded, then the guards.

    ``range_constraints``: the ExportedProgram's (None: the sizes' own ShapeEnv);
    ``guards``: its guard strings, checked by ``check_guards`` on every call.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ranges = input_ranges([n.meta.get("val") for n in placeholders], range_constraints)
    checked = []
    lstm = captured_recurrent(gm)
    recurrent = str(lstm.target) if lstm is not None else ""
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            checked.append(node)
            continue
        static = tuple((d, int(s)) for d, s in enumerate(val.shape)
                       if not isinstance(s, torch.SymInt))
        users = list(node.users)
        with gm.graph.inserting_after(node):
            guard = gm.graph.call_function(check_input, (node, i, val.dim(), static, ranges[i],
                                                         recurrent))
        guard.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
        for user in users:
            user.replace_input_with(node, guard)
        checked.append(guard)
    keys = keys or placeholder_keys(gm)
    guards = tuple(shared_size_guards([n.meta.get("val") for n in placeholders], keys)) + guards
    if guards and placeholders:
        texts = guard_texts(list(dict.fromkeys(guards)), keys)
        with gm.graph.inserting_after(checked[-1]):
            gm.graph.call_function(check_guards, (tuple(checked), tuple(keys), texts))


def captured_ranges(gm: fx.GraphModule) -> tuple[tuple[int, int, int, int | None], ...]:
    """(input, dim, least, most) of each dynamic dim the graph's input guards allow."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is check_input:
            index, bounds = node.args[1], node.args[4] if len(node.args) > 4 else ()
            for bound in bounds:
                dim, least, most = bound if len(bound) == 3 else (bound[0], 0, bound[1])
                found.append((index, dim, least, most))
    return tuple(found)


def captured_training(graph: fx.Graph) -> bool:
    """True when the graph's mode-dependent ops ran in train mode at capture (False: none)."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.batch_norm.default, aten._native_batch_norm_legit.default,
                           aten._native_batch_norm_legit_functional.default):
            return bool(node.args[5]) if len(node.args) > 5 else False
        if node.target in (aten.dropout.default, aten.feature_dropout.default):
            return bool(node.args[2]) if len(node.args) > 2 else False
    return False


class GuardTracer(fx.Tracer):
    """The fx tracer that re-traces a guarded graph when it is unpickled (``.pt``, deepcopy).

    ``torch.fx.wrap`` patches ``check_input`` only under its own name in this
    module; generated code calls it by another, so a plain Tracer would run the
    check on Proxies, where it does nothing, and the graph would come back
    without it. Autowrapped by identity, both checks stay calls in the graph.
    """

    def __init__(self, autowrap_modules=(), autowrap_functions=()):
        super().__init__(autowrap_modules=tuple(autowrap_modules) or (__import__("math"),),
                         autowrap_functions=(check_input, check_guards,
                                             *autowrap_functions))


def is_unlifted(gm: fx.GraphModule) -> bool:
    """True for ``ep.module()`` results (pytree calling convention; they refuse ``.train()``)."""
    return isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen)


def as_module(model) -> nn.Module:
    """``model`` as a module that follows ``.train()``/``.eval()``.

    An ExportedProgram, or the ``ep.module()`` of one (which refuses ``.eval()``),
    becomes a plain GraphModule: a new module over a copy of the graph that
    shares the caller's parameters and buffers and never writes them (the
    caller's object is untouched; every stage that edits weights copies first,
    so a call deep-copies the model once). Anything else is returned as it is.
    Every entry point that takes a model calls this, so users may pass what
    torch.export gave them.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return graph_module_from_export(model)
    if isinstance(model, fx.GraphModule) and is_unlifted(model):
        import copy
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree specs warn on deepcopy
            graph = copy.deepcopy(model.graph)  # nodes only: tensors stay shared
        shell = fx.GraphModule(model, graph)
        for name in ("_in_spec", "_out_spec"):
            if name in model.__dict__:
                shell.__dict__[name] = model.__dict__[name]
        return plain_graph_module(shell)
    return model


def graph_module_from_export(ep: torch.export.ExportedProgram,
                             guards: tuple[str, ...] | None = None) -> fx.GraphModule:
    """A plain, trainable GraphModule from an ExportedProgram.

    Args:
        ep: from ``torch.export.export`` or ``torch.export.load``.
        guards: the program's guard texts when they were taken off ``ep`` before
            ``ep.module()`` could compile them (an untrusted archive); default ``ep``'s.

    Returns:
        A GraphModule that follows ``.train()``/``.eval()``, with BatchNorm,
        Dropout and our shortcuts as modules owning the program's tensors, and
        guards that refuse sizes the capture did not cover (static sizes, each
        dynamic dim's range from ``ep.range_constraints``, ``ep``'s recorded
        guards). It starts in the mode it was captured in (``captured_training``).
        ``capture_info(gm)`` says "export", which dims stayed dynamic and their ranges.

    Raises:
        ShapeError: ``ep`` records a guard ressurgeon cannot check.
    """
    unlifted = ep.module()
    return plain_graph_module(unlifted, range_constraints=dict(ep.range_constraints),
                              guards=tuple(guards if guards is not None
                                           else getattr(ep, "_guards_code", None) or ()),
                              keys=placeholder_keys(unlifted, ep.example_inputs))


def plain_graph_module(unlifted: fx.GraphModule, *, range_constraints: dict | None = None,
                       guards: tuple[str, ...] = (), keys: list[tuple] | None = None
                       ) -> fx.GraphModule:
    """The conversion behind ``graph_module_from_export``, for an ``ep.module()`` result.

    The graph object is taken over, not copied: pass a module you own. Without
    ``range_constraints`` the ranges are read from the sizes' own ShapeEnv;
    ``guards``/``keys``: the program's guard strings and each input's path.
    """
    out_spec = getattr(unlifted, "_out_spec", None)
    if keys is None:
        keys = placeholder_keys(unlifted)  # while its forward still has the user's arg names
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="ExportedModel")
    # A dynamic-shape export leaves its ShapeEnv behind: unpicklable, and not
    # needed once the graph runs on real tensors (it lives on in node.meta["val"]).
    for name in ("shape_env", "_in_spec", "_out_spec"):
        gm.__dict__.pop(name, None)  # the pytree specs only warn on deepcopy once unused
    # Unpickling re-traces the generated code with the graph's tracer class;
    # export's needs constructor arguments, ours none, and keeps the input checks.
    gm._tracer_cls, gm._tracer_extras, gm.graph._tracer_cls = GuardTracer, {}, GuardTracer
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
    training = captured_training(graph)
    _modules_from_mode_ops(gm)
    lift_shortcuts(gm)
    lift_weighted_ops(gm)  # Conv/Linear modules again: editable, widenable, readable
    if not any(n.target is check_input for n in graph.nodes):
        _guard_inputs(gm, range_constraints, guards, keys)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.train(training)
    gm.meta[META] = CaptureInfo(method="export", dynamic=captured_dims(gm),
                                ranges=captured_ranges(gm))
    return gm


__all__ = ["graph_module_from_export", "plain_graph_module", "lift_weighted_ops",
           "dynamic_args", "dynamic_dims", "export_attempts", "batched_dims", "captured_dims",
           "check_input", "as_module", "pinned_batch", "captured_ranges", "captured_training",
           "is_unlifted"]
