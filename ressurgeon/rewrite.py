"""Stage 4, rewrite: traced graph + plan -> rewritten GraphModule + Skip records.

The plan is checked against the graph first (nodes exist, the source
dominates the target, the shapes fit the kind); only then is anything
inserted. Shortcuts are real submodules (``Shortcut``) with names derived
from the layers they join.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import fx

from .errors import PlanError
from .plan import PlannedSkip, SurgeryPlan
from .registry import build_projection
from .shortcuts import Shortcut
from .spans import analyze_graph, join_kind
from .trace import META, free_name


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
    params: int                # parameters added (gate + projection)

    def to_dict(self) -> dict:
        return {**self.__dict__, "src_shape": list(self.src_shape),
                "dst_shape": list(self.dst_shape)}


def apply_plan(gm: fx.GraphModule, plan: SurgeryPlan, *,
               inplace: bool = False) -> tuple[fx.GraphModule, list[Skip]]:
    """Insert the planned shortcuts into a traced graph.

    Args:
        gm: a GraphModule from ``trace_model`` (shapes in node.meta).
        plan: from ``plan_skips`` or ``SurgeryPlan.load``.
        inplace: edit ``gm`` itself instead of a copy.

    Returns:
        The rewritten GraphModule and one Skip per inserted shortcut.

    Raises:
        PlanError: the plan names a node the graph lacks, a source that does not
            dominate its target, or a kind that the shapes do not allow.

    Example:
        >>> module, skips = apply_plan(trace_model(m, x), plan)   # doctest: +SKIP
    """
    if not inplace:
        gm = copy.deepcopy(gm)
    analysis = analyze_graph(gm)
    checked = [_check(analysis, skip) for skip in plan.skips]
    _check_disjoint(analysis, plan.skips)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    checked.sort(key=lambda item: order[item[2]])

    current: dict[fx.Node, fx.Node] = {}  # a target's original node -> the sum that replaced it
    skips = []
    init = plan.config.init
    for planned, src, dst in checked:
        info = src.meta[META]
        proj = None
        if planned.kind == "projection":
            proj = build_projection(info["shape"], dst.meta[META]["shape"],
                                    planned.channel_axis, planned.stride)
        module = Shortcut(init, proj).to(device=info["device"], dtype=info["dtype"])
        name = free_name(gm, _module_name(planned))
        gm.add_submodule(name, module)
        source = current.get(src, src)
        with gm.graph.inserting_after(dst):
            total = gm.graph.call_module(name, (dst, source))
        total.meta[META] = dict(dst.meta[META], skip=name)
        dst.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        current[dst] = total
        skips.append(Skip(name=name, source=src.name, target=dst.name,
                          source_layer=planned.source_layer, target_layer=planned.target_layer,
                          kind=planned.kind, init=init, src_shape=info["shape"],
                          dst_shape=dst.meta[META]["shape"], stride=planned.stride,
                          params=sum(p.numel() for p in module.parameters())))
    gm.graph.lint()
    gm.recompile()
    return gm, skips


def _check(analysis, skip: PlannedSkip) -> tuple[PlannedSkip, fx.Node, fx.Node]:
    nodes = analysis.nodes
    for end in (skip.source, skip.target):
        if end not in nodes:
            raise PlanError(f"the plan names node '{end}', which this model's graph lacks; "
                            "write a fresh plan for this model with --plan-out")
    src, dst = nodes[skip.source], nodes[skip.target]
    where = f"skip {skip.source} -> {skip.target}"
    if src is dst or not analysis.dominators.dominates(src, dst):
        raise PlanError(f"{where}: a path from the input reaches {dst.format_node()} without "
                        f"passing {skip.source}, so the sum would not be a residual; pick a "
                        "source that every path to the target goes through")
    src_shape = src.meta.get(META, {}).get("shape")
    dst_shape = dst.meta.get(META, {}).get("shape")
    if src_shape is None or dst_shape is None:
        raise PlanError(f"{where}: both ends must be single tensors")
    joined = join_kind(src_shape, dst_shape, skip.channel_axis)
    if joined is None:
        raise PlanError(f"{where}: shapes {src_shape} and {dst_shape} cannot be joined by a "
                        "1x1 projection (rank, batch or spatial size differ)")
    kind, stride = joined
    if skip.kind == "identity" and kind != "identity":
        raise PlanError(f"{where}: shapes {src_shape} and {dst_shape} differ; use kind "
                        f"projection (stride {stride})")
    if skip.kind == "projection" and stride != skip.stride:
        raise PlanError(f"{where}: the shapes need stride {stride}, the plan says {skip.stride}")
    return skip, src, dst


def _check_disjoint(analysis, skips: tuple[PlannedSkip, ...]) -> None:
    seen: dict[str, PlannedSkip] = {}
    for skip in skips:
        if skip.target in seen:
            other = seen[skip.target]
            raise PlanError(f"two skips end at node '{skip.target}' (from {other.source} and "
                            f"{skip.source}); keep one of them")
        seen[skip.target] = skip


def name_part(name: str) -> str:
    """A layer name as it appears in a shortcut's module name (gates.py reads it back)."""
    return re.sub(r"\W+", "_", name).strip("_") or "node"


def _module_name(skip: PlannedSkip) -> str:
    return (f"skip_{name_part(skip.source_layer or skip.source)}"
            f"__{name_part(skip.target_layer or skip.target)}")
