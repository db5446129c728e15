"""deepen, analysis: every place a new block may go, chosen or rejected with a reason.

Analysis only: nothing here touches weights or edits the graph.

Mode ``copy`` (block expansion): a position is a residual block of the model, a block that
the new copy follows. Blocks are found two ways in the traced graph: the items of a
``ModuleList``/``Sequential`` (module paths ending in an index, ``blocks.3``, read from the
module stack every node records), and the spans our own shortcuts close (``find_shortcuts``:
a model that went through ``add_skips``). A block qualifies when its copy can start as exactly
the identity: its main path is a chain of identity residual adds ``x + f(x)`` from its input
to its output, each branch f ends in parameters whose zero makes it exactly zero
(``analysis.zeros``), and after the last add only ops that leave a non-negative stream
unchanged (ReLU-likes, dropout) stand. A post-norm block, ``norm(x + f(x))``, does not.

Mode ``new``: a position is a layer of the model (a weighted op with its norm and activation);
the new block ``x + out(act(layer(x)))`` goes after it, its layer shaped like this one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch.nn as nn
from torch import fx

from .._fx import info, op_name, shape_of
from ..analysis.layers import GraphAnalysis
from ..analysis.zeros import branch_end
from ..errors import ConfigError
from ..verdicts import Reason
from ..registry import Role, Trait, op_info
from ..shortcuts import Shortcut, find_shortcuts, is_shortcut
from ..config import DeepenConfig, How
from .decide import spread


# Reasons a position may still be chosen by an explicit plan (they are choices, not faults).
CHOICES = frozenset({Reason.EXCLUDED, Reason.SPREAD, Reason.NOT_IN_PLAN})


@dataclass(frozen=True)
class Position:
    """A place for a new block: after a residual block (copy) or after a layer (new).

    ``reason`` is None when a new block goes here; ``detail`` says more about a rejection
    (the op that stopped a branch). For copy, ``zero`` names the tensors each copy sets to
    zero (as named in the original); for new, ``width``/``kernel`` shape the new layer.
    """

    name: str
    how: How
    reason: Reason | None = None
    detail: str = ""
    shape: tuple[int, ...] | None = None
    zero: tuple[str, ...] = ()
    width: int = 0
    kernel: tuple[int, ...] = ()                 # () for Linear
    module: str = ""                             # copy: the module a copy clones ("" for a span)
    nodes: tuple[str, ...] = field(default=(), repr=False)   # copy: the block's nodes
    input: str = ""                              # the node the block reads
    output: str = ""                             # the node whose value the new block follows

    @property
    def chosen(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {"name": self.name, "how": self.how.value, "chosen": self.chosen,
                "reason": self.reason.value if self.reason else None, "detail": self.detail,
                "shape": list(self.shape) if self.shape else None, "zero": list(self.zero),
                "width": self.width or None, "kernel": list(self.kernel) or None}


def find_positions(analysis: GraphAnalysis, how: How) -> tuple[How, list[Position]]:
    """Every candidate position for ``how`` (auto: copy if any block qualifies, else new).

    Args:
        analysis: ``analyze_graph`` of the traced model (shapes in node.meta).
        how: the mode asked for.

    Returns:
        (the mode used, the positions in graph order, each qualifying (reason None) or
        rejected with a reason).
    """
    if how is How.NEW:
        return How.NEW, layer_positions(analysis)
    blocks = block_positions(analysis)
    if how is How.COPY or any(p.chosen for p in blocks):
        return How.COPY, blocks
    return How.NEW, layer_positions(analysis)


def choose(positions: list[Position], config: DeepenConfig) -> list[Position]:
    """Pick the positions that get a new block: the ``where`` matches, ``blocks`` of them spread.

    Raises:
        ConfigError: nothing qualifies, or more blocks than positions.
    """
    qualified = [p for p in positions if p.chosen]
    if config.where:
        allowed = [p for p in qualified if any(fnmatch.fnmatchcase(p.name, w)
                                               for w in config.where)]
    else:
        allowed = qualified
    if not allowed:
        raise ConfigError(no_position_message(positions, config))
    count = config.blocks if config.blocks is not None else len(allowed)
    if count > len(allowed):
        raise ConfigError(f"blocks={count} but only {len(allowed)} position(s) qualify "
                          f"({', '.join(p.name for p in allowed[:4])}"
                          f"{', ...' if len(allowed) > 4 else ''}); ask for fewer blocks, or "
                          "write a plan that repeats a position")
    picked = {allowed[i].name for i in spread(len(allowed), count)}
    allowed_names = {p.name for p in allowed}
    return [p if not p.chosen or p.name in picked else
            replace(p, reason=Reason.SPREAD if p.name in allowed_names else Reason.EXCLUDED)
            for p in positions]


def no_position_message(positions: list[Position], config: DeepenConfig) -> str:
    """Why no position qualifies, in one line that names the fix."""
    if any(p.chosen for p in positions):
        names = ", ".join(p.name for p in positions if p.chosen)
        return (f"no position matches where={list(config.where)}; the qualifying ones are "
                f"{names[:200]}")
    if not positions:
        what = "residual block" if config.how is How.COPY else "layer"
        return f"the model has no {what} to put a new block after"
    counts: dict[Reason, int] = {}
    for p in positions:
        counts[p.reason] = counts.get(p.reason, 0) + 1
    first = next(p for p in positions if not p.chosen)
    detail = f" ({first.name}: {first.detail})" if first.detail else f" (e.g. {first.name})"
    fix = ("; try how='new' (--how new)" if positions[0].how is How.COPY
           else "; try how='copy' (--how copy)")
    return ("no position qualifies: " + "; ".join(f"{n} {r.text}" for r, n in counts.items())
            + detail + fix)


# -- copy: residual blocks ------------------------------------------------------------------------

def block_positions(analysis: GraphAnalysis) -> list[Position]:
    """The stack items and shortcut spans of the graph, judged as blocks to copy, in graph order."""
    gm = analysis.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions = _item_regions(gm)
    found: list[Position] = []
    done: set[str] = set()
    for path in sorted(regions, key=lambda p: (p.count("."), order[regions[p][0]])):
        if any(path.startswith(d + ".") for d in done):
            continue   # inside a block judged already (its items are no blocks of their own)
        pos = _judge(analysis, path, regions[path], module=path)
        # a block's verdict stands; an item holding no residual may hold blocks of its own
        if pos.reason is not Reason.NO_RESIDUAL or not any(p.startswith(path + ".")
                                                           for p in regions):
            found.append(pos)
            done.add(path)
    covered = {n for path in done for n in regions[path]}
    for site in find_shortcuts(gm):   # the addition join's identity spans (not highway, concat)
        if not isinstance(site.module, Shortcut) or site.module.kind != "identity":
            continue
        region = _span_region(site.x, site.node, analysis.modules)
        if not covered.isdisjoint(region):
            continue   # a shortcut inside a block already judged
        found.append(_judge(analysis, site.path, region, module=""))
    return sorted(found, key=lambda p: order[analysis.nodes[p.output]] if p.output
                  else order[analysis.nodes[p.nodes[-1]]])


def _paths(node: fx.Node) -> set[str]:
    """The module paths a node belongs to: its module stack, or its target's owners."""
    found = {p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p}
    if node.op in ("call_module", "get_attr"):
        parts = str(node.target).split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + (node.op == "call_module")))
    return found


def _item_regions(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """{``container.<i>`` path: its nodes in graph order} for every indexed module path."""
    regions: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path in _paths(node):
            head, _, last = path.rpartition(".")
            if head and last.isdigit():
                regions.setdefault(path, []).append(node)
    return regions


def _span_region(x: fx.Node, join: fx.Node, modules: dict) -> list[fx.Node]:
    """The nodes of a shortcut's span: on a path from ``x`` to the join (and the parameters they
    read), then the join and the activation that follows it."""
    after: set[fx.Node] = set()
    stack = list(x.users)
    while stack:
        n = stack.pop()
        if n not in after:
            after.add(n)
            stack.extend(n.users)
    inside: set[fx.Node] = set()
    stack = [join]
    while stack:
        n = stack.pop()
        if n in inside or n not in after:
            continue
        inside.add(n)
        stack.extend(n.all_input_nodes)
    inside |= {a for n in inside for a in n.all_input_nodes if a.op == "get_attr"}
    users = list(join.users)
    if len(users) == 1 and _keeps_nonnegative(users[0], modules):
        inside.add(users[0])
    return [n for n in join.graph.nodes if n in inside]


def _keeps_nonnegative(node: fx.Node, modules: dict) -> bool:
    """An op that leaves a non-negative tensor unchanged: a ReLU-like activation or an eval no-op
    (so ``relu(x + 0) == x`` for the copy, whose input came out of the same op)."""
    info_ = op_info(node, modules)
    if info_ is None or len(node.all_input_nodes) != 1:
        return False
    return Trait.EVAL_NOOP in info_.traits or (info_.role is Role.ACTIVATION
                                                 and Trait.POSITIVE_HOMOGENEOUS in info_.traits)


def _judge(analysis: GraphAnalysis, name: str, region: list[fx.Node], *, module: str) -> Position:
    """A block's verdict: the tensors its copies zero, or the reason no copy is the identity."""
    modules, nodes = analysis.modules, analysis.nodes
    inside = set(region)
    base = dict(name=name, how=How.COPY, module=module, nodes=tuple(n.name for n in region))
    outs = [n for n in region if any(u not in inside for u in n.users)]
    if len(outs) != 1:
        return Position(**base, reason=Reason.OUTPUTS if outs else Reason.NO_RESIDUAL)
    y = outs[0]
    base.update(output=y.name, shape=shape_of(y))
    residuals = [r for r in analysis.residuals if nodes[r.target] in inside]
    if not residuals:
        return Position(**base, reason=Reason.NO_RESIDUAL)
    # the main path: residual adds chained from the block's input, each reading the last
    x = next((nodes[r.source] for r in residuals if nodes[r.source] not in inside), None)
    if x is None:
        return Position(**base, reason=Reason.NOT_IDENTITY, detail="no residual reads the "
                        "block's input")
    base["input"] = x.name
    if shape_of(x) != shape_of(y) or info(x).dtype != info(y).dtype:
        return Position(**base, reason=Reason.CHANGES_SHAPE,
                        detail=f"{shape_of(x)} -> {shape_of(y)}")
    stream, zero = x, []
    while (r := next((r for r in residuals if r.source == stream.name), None)) is not None:
        merge = nodes[r.target]
        if r.kind != "identity":
            return Position(**base, reason=Reason.CHANGES_SHAPE, detail="a projection shortcut")
        branch = _branch(merge, stream, modules)
        if branch is None:
            return Position(**base, reason=Reason.NOT_IDENTITY,
                            detail=f"{merge.name} does not add {stream.name} itself")
        end = branch_end(branch, modules)
        if not end.zeroable:
            return Position(**base, reason=Reason.NO_BRANCH_END, detail=f"ends in {end.op}")
        if _shared(end.tensors, inside, analysis.gm):
            return Position(**base, reason=Reason.SHARED, detail=end.name)
        zero.extend(end.tensors)
        stream = merge
    node = y
    while node is not stream:
        if node not in inside or not _keeps_nonnegative(node, modules):
            return Position(**base, reason=Reason.NOT_IDENTITY,
                            detail=f"{op_name(node, modules)} after the last residual add")
        node = node.all_input_nodes[0]
    return Position(**base, zero=tuple(dict.fromkeys(zero)))


def _branch(merge: fx.Node, stream: fx.Node, modules: dict) -> fx.Node | None:
    """The residual branch's value at ``merge`` when its other operand is ``stream`` itself."""
    if merge.op == "call_module" and is_shortcut(modules[merge.target]):
        h, x = merge.args[:2]   # a copy joins with a plain add: only x itself may come in
        return h if x is stream else None
    args = [a for a in merge.args if isinstance(a, fx.Node)]
    if merge.kwargs or len(merge.args) != 2 or len(args) != 2 or stream not in args:
        return None
    other = args[1] if args[0] is stream else args[0]
    return other if other is not stream else None


def _shared(tensors: tuple[str, ...], inside: set[fx.Node], gm: fx.GraphModule) -> bool:
    """A tensor to zero that a node outside the block reads (tied weights, a module used twice)."""
    owners = {t.rpartition(".")[0] for t in tensors} | set(tensors)
    return any(n.op in ("call_module", "get_attr") and str(n.target) in owners
               and n not in inside for n in gm.graph.nodes)


# -- new: plain layers ------------------------------------------------------------------------

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def layer_positions(analysis: GraphAnalysis) -> list[Position]:
    """Every layer of the graph, judged as a place for a new residual layer, in graph order."""
    found = []
    for lay in analysis.layers:
        out = analysis.nodes[lay.out]
        shape, dtype = shape_of(out), info(out).dtype
        base = dict(name=lay.name, how=How.NEW, shape=shape, input=out.name, output=out.name)
        if lay.name in analysis.heads:
            found.append(Position(**base, reason=Reason.HEAD))
            continue
        if shape is None or dtype is None or not dtype.is_floating_point:
            found.append(Position(**base, reason=Reason.NOT_TENSOR))
            continue
        kernel = _kernel(analysis.nodes[lay.anchor], analysis)
        if kernel is None or (kernel and (lay.channel_axis != 1 or len(shape) != len(kernel) + 2)) \
                or (not kernel and lay.channel_axis != -1):
            found.append(Position(**base, reason=Reason.UNSUPPORTED,
                                  detail=op_name(analysis.nodes[lay.anchor], analysis.modules)))
            continue
        found.append(Position(**base, width=shape[lay.channel_axis], kernel=kernel))
    return found


def _kernel(anchor: fx.Node, analysis: GraphAnalysis) -> tuple[int, ...] | None:
    """The kernel size of a conv layer, () for a linear one, None for any other weighted op."""
    if anchor.op == "call_module":
        module = analysis.modules[anchor.target]
        if type(module) in _CONVS:
            return tuple(module.kernel_size)
        return () if isinstance(module, nn.Linear) else None
    info_ = op_info(anchor, analysis.modules)
    if info_ is None or Trait.LIFTABLE not in info_.traits:
        return None
    weight = anchor.args[1] if len(anchor.args) > 1 else None
    value = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    shape = shape_of(weight) if isinstance(weight, fx.Node) else None
    shape = shape or (tuple(value.shape) if value is not None else None)
    if shape is None and isinstance(weight, fx.Node) and weight.op == "get_attr":
        from .._fx import attr
        shape = tuple(attr(analysis.gm, weight.target).shape)
    if shape is None:
        return None
    return tuple(shape[2:]) if info_.spatial_dims else ()
