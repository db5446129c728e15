"""Stage 4, rewrite: traced graph + plan -> rewritten GraphModule + Skip records.

Decide, check, then execute: every planned shortcut is checked against the
graph analysis first with the same ``pair_verdict`` that selection uses (the
nodes exist, the source dominates the target, both are tensors of one dtype,
the shapes fit the kind); only then is anything inserted. Heuristics that a
hand-edited plan may override (layout, squeezed ends, overlaps, the head, an
existing residual) are recorded on the Skip as ``overrides``. Shortcuts are
real submodules (``Shortcut``) named after the layers they join.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass, replace

import torch
from torch import fx

from .._fx import free_name, info, node_order, set_info
from .._torch import quiet_copy
from ..analysis.layers import GraphAnalysis, analyze_graph
from ..errors import PlanError
from ..catalog import join_class, pattern_class
from ..shortcuts._graph import Fit
from .plan import PlannedSkip, SurgeryPlan
from .select import Reason, end_name, units_between


@dataclass(frozen=True)
class Skip:
    """One inserted shortcut, as a report sees it."""

    name: str                  # submodule name in the rewritten GraphModule
    source: str                # node whose output the shortcut reads
    target: str                # node whose output the sum replaces
    source_layer: str
    target_layer: str
    kind: str                  # "identity" | "projection"
    init: str
    src_shape: tuple[int, ...]
    dst_shape: tuple[int, ...]
    stride: int
    params: int                # parameters added (gate, projection, transform, new columns)
    overrides: tuple[str, ...] = ()  # heuristics a plan overrode (Reason values)
    join: str = "add"          # "add", "highway" or "concat"
    channel_axis: int = 1      # where both ends keep their channels
    consumer_layer: str | None = None  # concat: the layer widened to take the features

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Checked:
    planned: PlannedSkip
    source_layer: str
    target_layer: str
    overrides: tuple[str, ...]
    consumer_layer: str | None = None


def apply_plan(gm: fx.GraphModule, plan: SurgeryPlan, *, analysis: GraphAnalysis | None = None,
               inplace: bool = False) -> tuple[fx.GraphModule, list[Skip]]:
    """Insert the planned shortcuts into a traced graph.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).
        plan: from ``plan_skips`` or ``SurgeryPlan.load``.
        analysis: ``analyze_graph(gm)`` when the caller has it (it is not computed again).
        inplace: edit ``gm`` itself instead of a copy.

    Returns:
        The rewritten GraphModule and one Skip per inserted shortcut.

    Raises:
        PlanError: the plan names a node the graph lacks, a source that does not
            dominate its target, ends of another dtype or shapes that do not fit
            the kind, or layer names that disagree with its node names.

    Example:
        >>> module, skips = apply_plan(trace_model(m, x), plan)   # doctest: +SKIP
    """
    analysis = analysis if analysis is not None else analyze_graph(gm)
    checked = check_plan(analysis, plan)
    if not inplace:
        gm = quiet_copy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = node_order(gm.graph)
    checked.sort(key=lambda c: order[nodes[c.planned.target]])

    current: dict[fx.Node, fx.Node] = {}  # a target's original node -> the sum that replaced it
    skips = []
    config = plan.config
    join = join_class(config.join)
    with _seeded(config.seed):  # the new weights from the config's seed (None: torch's RNG)
        for item in checked:
            skips.append(_insert(gm, join, config, item, nodes, current))
    if skips:  # an empty plan leaves the graph and its code as they were
        gm.graph.lint()
        gm.recompile()
    return gm, skips


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draw from a generator seeded with ``seed``, leaving torch's global RNG as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _insert(gm: fx.GraphModule, join, config, item: "_Checked", nodes: dict,
            current: dict) -> Skip:
    """Insert one checked planned skip; ``current`` maps replaced nodes to their sums."""
    planned = item.planned
    src, dst = nodes[planned.source], nodes[planned.target]
    src_info, dst_info = info(src), info(dst)
    name = free_name(gm, _module_name(item.source_layer, item.target_layer))
    consumer = nodes.get(planned.consumer) if planned.consumer else None
    replaced, replacing, params = join.insert(gm, name, planned, config.init,
                                              current.get(src, src), dst, consumer)
    if planned.fit:
        _insert_fit(gm, name, planned.channel_axis)
    if replacing is not replaced:
        current[replaced] = replacing
    return Skip(name=name, source=src.name, target=dst.name,
                source_layer=item.source_layer, target_layer=item.target_layer,
                kind=planned.kind, init=config.init.value, src_shape=src_info.shape,
                dst_shape=dst_info.shape, stride=planned.stride, params=params,
                overrides=item.overrides, join=config.join,
                channel_axis=planned.channel_axis,
                consumer_layer=item.consumer_layer)


def check_plan(analysis: GraphAnalysis, plan: SurgeryPlan) -> list[_Checked]:
    """Check every planned skip against the graph; raise PlanError for the first that cannot work."""
    targets: dict[str, PlannedSkip] = {}
    for skip in plan.skips:
        if skip.target in targets:
            other = targets[skip.target]
            raise PlanError(f"two skips end at node '{skip.target}' (from {other.source} and "
                            f"{skip.source}); keep one of them")
        targets[skip.target] = skip
    residual_layers = {name for b in analysis.blocks if b.kind == "residual"
                       for name in (b.name, *b.covers)}
    join = join_class(plan.config.join)
    nests = getattr(pattern_class(plan.config.pattern), "nests", False)
    checked, owners, insides = [], {}, []
    for i, skip in enumerate(plan.skips):
        if skip.kind not in join.planned_kinds:
            raise PlanError(f"skip {skip.source} -> {skip.target} is of kind {skip.kind}, but the "
                            f"plan's join {plan.config.join} takes skips of kind "
                            f"{' or '.join(join.planned_kinds)}")
        item, inside = _check(analysis, join, skip, residual_layers)
        checked.append(item)
        insides.append(inside)
        for name in inside:
            owners.setdefault(name, []).append(i)
    # Plan skips that share a layer are allowed, and reported as overriding ``overlaps``;
    # for a pattern whose pairs nest (mirror: U-Net's outer pairs hold the inner ones), a
    # skip inside another is no overlap.
    overlapping = {i for users in owners.values() if len(users) > 1 for i in users
                   if not (nests and all(_nested(insides[i], insides[j]) for j in users))}
    return [replace(c, overrides=(*c.overrides, Reason.OVERLAPS.value)) if i in overlapping
            else c for i, c in enumerate(checked)]


def _check(analysis: GraphAnalysis, join, skip: PlannedSkip,
           residual_layers: set[str]) -> tuple[_Checked, set[str]]:
    nodes = analysis.nodes
    for end in (skip.source, skip.target):
        if end not in nodes:
            raise PlanError(f"the plan names node '{end}', which this model's graph lacks; "
                            "write a fresh plan for this model with --plan-out")
    src, dst = nodes[skip.source], nodes[skip.target]
    where = f"skip {skip.source} -> {skip.target}"
    (src_name, src_axis), (dst_name, _) = end_name(analysis, src), end_name(analysis, dst)
    for given, actual, end in ((skip.source_layer, src_name, skip.source),
                               (skip.target_layer, dst_name, skip.target)):
        if given and given != actual:
            raise PlanError(f"{where}: the plan calls node '{end}' layer '{given}', but in this "
                            f"graph it belongs to layer '{actual}'; a plan entry is identified by "
                            "its node names: fix the layer name or leave it empty")
    verdict, consumer_layer = join.check_planned(analysis, skip, src, dst, src_axis, where)
    enforced = verdict.enforced
    a, b = info(src).shape, info(dst).shape
    if Reason.NOT_TENSOR in enforced:
        raise PlanError(f"{where}: both ends must be single tensors")
    if Reason.NOT_DOMINATED in enforced:
        raise PlanError(f"{where}: a path from the input reaches {dst.format_node()} without "
                        f"passing {skip.source}, so the sum would not be a residual; pick a "
                        "source that every path to the target goes through")
    if Reason.DTYPE in enforced:
        raise PlanError(f"{where}: the ends have different dtypes ({info(src).dtype} and "
                        f"{info(dst).dtype}); pick ends of one dtype")
    if Reason.SHAPE in enforced:
        raise PlanError(f"{where}: shapes {a} and {b} cannot be joined by a 1x1 projection "
                        "(rank, batch or spatial size differ)")
    if Reason.NON_FINITE in enforced:
        raise PlanError(f"{where}: the shortcut path would be NaN or infinite on the example "
                        f"inputs (|x| up to {info(src).absmax:.3g} in {info(src).dtype}); pick "
                        "another source, or run in a wider dtype")
    if skip.kind == "identity" and verdict.kind != "identity":
        raise PlanError(f"{where}: shapes {a} and {b} differ; use kind projection "
                        f"(stride {verdict.stride})")
    if skip.kind != "identity" and verdict.stride != skip.stride:
        raise PlanError(f"{where}: the shapes need stride {verdict.stride} (the {skip.kind}'s "
                        f"stride or pooling factor), the plan says {skip.stride}")
    overrides = [r.value for r in verdict.reasons if r.overridable]
    inside = {u.name for u in units_between(analysis, src, dst)}
    if inside & analysis.heads:
        overrides.append(Reason.HEAD.value)
    if inside & residual_layers:
        overrides.append(Reason.EXISTING.value)
    item = _Checked(planned=skip, source_layer=src_name, target_layer=dst_name,
                    overrides=tuple(overrides), consumer_layer=consumer_layer)
    return item, inside


def _nested(a: set[str], b: set[str]) -> bool:
    return a <= b or b <= a


def _insert_fit(gm: fx.GraphModule, name: str, channel_axis: int) -> None:
    """Crop or pad what join ``name`` reads as x to its h's size at run time (``Fit``).

    Every join module is called as ``name(h, x)``; the fit goes between x and that call.
    """
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    h, x = call.args[0], call.args[1]
    shape = info(x).shape
    spatial = len(shape) - 2
    fit = free_name(gm, f"{name}_fit")
    gm.add_submodule(fit, Fit(channel_axis, spatial))
    with gm.graph.inserting_before(call):
        node = gm.graph.call_module(fit, (x, h))
    set_info(node, **info(x).__dict__)
    call.update_arg(1, node)


def name_part(name: str) -> str:
    """A layer name as it appears in a shortcut's module name (gates.py reads it back)."""
    return re.sub(r"\W+", "_", name).strip("_") or "node"


def _module_name(source_layer: str, target_layer: str) -> str:
    return f"skip_{name_part(source_layer)}__{name_part(target_layer)}"
