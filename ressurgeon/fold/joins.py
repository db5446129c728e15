"""fold, step 3: every shortcut as a sum of terms, and what fold did with it.

A shortcut's terms come from the module itself (``Shortcut.terms()``): each
is ``coef * P(v)``, v the span's output h or its input x, P the projection or
nothing, coef the gate's value or 1. A term whose gate is exactly 0 is
dropped: ``preserve`` with a = 0 leaves ``h``; ``rezero`` with a = 0 leaves
``S(x)``, so the whole span goes (it is not the shortcut that is removable there).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from torch import fx

from .._fx import META, free_name
from ..shortcuts import ShortcutSite, find_shortcuts, is_shortcut
from ..shortcuts.base import fit_spatial, strided


class Outcome(StrEnum):
    """What fold did with a shortcut."""

    REMOVED = "removed"            # gate exactly 0: the sum is the span's output
    SPAN_REMOVED = "span-removed"  # rezero gate exactly 0: the block is its shortcut alone
    MERGED = "merged"              # into the span's conv/linear weights (RepVGG-style)
    ABSORBED = "absorbed"          # the gate went into weights; a plain Add remains
    PLAIN = "plain"                # no gate: a plain Add remains
    KEPT = "kept"                  # the gate stays as a Mul; ``reason`` says why


@dataclass
class FoldedSkip:
    """What fold did with one shortcut.

    ``outcome`` is an ``Outcome``. For ``kept``, ``reason`` says why the gate
    stayed; for other outcomes ``reason``, when set, says why a shortcut around
    one layer could not be merged into it. ``fusion`` is ``"conv+add+act"`` or
    ``"conv+add"`` when ONNX Runtime and TensorRT can fuse the Add into the
    convolution before it, else None.
    """

    name: str
    kind: str                   # identity | projection
    init: str                   # preserve | standard | rezero
    gate: float | None
    outcome: Outcome = Outcome.PLAIN
    reason: str | None = None
    fusion: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldTerm:
    node: fx.Node                 # the value the term reads
    proj: str | None              # submodule path of its projection
    coef: float                   # its coefficient (1.0 without one)
    operand: str = "h"            # "h" (the span) or "x" (the shortcut)


@dataclass
class Join:
    node: fx.Node                 # the node whose value is the sum (the Shortcut call)
    terms: list[FoldTerm] | None  # None: a join that is no sum of terms (highway, concat)
    record: FoldedSkip
    add: fx.Node | None = None    # the emitted Add
    gates: dict = field(default_factory=dict)   # emitted Mul node -> gate
    site: ShortcutSite | None = None


def collect_joins(gm: fx.GraphModule) -> list[Join]:
    """One Join per shortcut module call in ``gm`` (inlined ones are lifted before)."""
    joins = []
    for site in find_shortcuts(gm):
        module = site.module
        init = module.init.value if module.init is not None else "unknown"
        if module.terms() is None:
            gate = None if module.gate is None else float(module.gate.detach().abs().max())
            record = FoldedSkip(name=site.path, kind=module.kind, init=init, gate=gate)
            joins.append(Join(node=site.node, terms=None, record=record, site=site))
            continue
        gate = None if module.gate is None else float(module.gate.detach())
        proj = None if module.kind == "identity" else f"{site.path}.proj"
        operands = {"h": site.h, "x": site.x}
        terms = [FoldTerm(operands[t.operand], proj if t.projected else None,
                          1.0 if t.coef is None else float(module.coefficient(t.coef).detach()),
                          t.operand) for t in module.terms()]
        record = FoldedSkip(name=site.path, kind=module.kind, init=init, gate=gate)
        joins.append(Join(node=site.node, terms=terms, record=record, site=site))
    return joins


def close_opaque(gm: fx.GraphModule, joins: list[Join], modules: dict) -> None:
    """Joins that are no sum of terms: removed when still closed, else kept (and said why).

    A highway whose gate is exactly 0 computes h (preserve) or S(x) (rezero); a
    concat whose widened layer's new weights are all still 0 computes what the
    narrow layer did, so that layer is narrowed back.
    """
    for join in joins:
        if join.terms is not None:
            continue
        site, module = join.site, join.site.module
        undone = module.fold_back(gm, site, modules)  # a join with a rule of its own
        if undone is not None:
            if undone == "removed":
                join.record.outcome = Outcome.REMOVED
            else:
                join.record.outcome, join.record.reason = Outcome.PLAIN, undone
            continue
        closed = module.reduces_to()
        if closed is None:
            join.record.outcome = Outcome.KEPT
            join.record.reason = module.kept_reason
            continue
        value = site.h
        if closed == "x":
            value = site.x
            if module.kind == "projection":
                with gm.graph.inserting_before(site.node):
                    value = gm.graph.call_module(_own_proj(gm, join, f"{site.path}.proj"),
                                                 (site.x,))
        site.node.replace_all_uses_with(value)
        rebind(joins, site.node, value)
        gm.graph.erase_node(site.node)
        join.record.outcome = Outcome.REMOVED if closed == "h" else Outcome.SPAN_REMOVED


def drop_zero_terms(joins: list[Join]) -> None:
    for join in joins:
        if join.terms is None:
            continue
        kept = [t for t in join.terms if t.coef != 0.0]
        if len(kept) == len(join.terms):
            continue
        dropped_span = any(t.operand == "h" for t in join.terms if t.coef == 0.0)
        join.terms = kept
        join.record.outcome = Outcome.SPAN_REMOVED if dropped_span else Outcome.REMOVED


def rebind(joins: list[Join], old: fx.Node, new: fx.Node) -> None:
    """Later shortcuts that read a replaced sum (post-activation chains) read its replacement."""
    for join in joins:
        for term in join.terms or ():
            if term.node is old:
                term.node = new


def emit_sums(gm: fx.GraphModule, joins: list[Join]) -> None:
    """Every join becomes ``add(c1*P1(v1), c2*P2(v2))`` with explicit projection calls and Muls.

    The Shortcut module goes; its projection, where a term still uses it, moves
    to a free path beside it.
    """
    for join in joins:
        if join.record.outcome is Outcome.MERGED or join.terms is None:
            continue
        values = []
        h = next((t.node for t in join.terms if t.operand == "h"), None)
        with gm.graph.inserting_before(join.node):
            for term in join.terms:
                value = term.node
                if term.proj is not None:
                    path = _own_proj(gm, join, term.proj)
                    value = gm.graph.call_module(path, (value,))
                    if strided(gm.get_submodule(path)) and h is not None:  # odd sizes
                        value = gm.graph.call_function(fit_spatial, (value, h))
                    elif strided(gm.get_submodule(path)):  # the span is gone, its size too
                        join.record.reason = ("span removed: at input sizes where the span gave "
                                              "fewer positions than ceil(H/stride), the result "
                                              "now gives ceil(H/stride)")
                if term.coef != 1.0:
                    mul = gm.graph.call_function(operator.mul, (value, term.coef))
                    join.gates[mul] = term.coef
                    value = mul
                values.append(value)
            out = values[0] if len(values) == 1 else gm.graph.call_function(operator.add,
                                                                            tuple(values))
        if len(values) == 2:
            join.add = out
        if META in join.node.meta:
            out.meta[META] = join.node.meta[META]
        join.node.replace_all_uses_with(out)
        rebind(joins, join.node, out)
        gm.graph.erase_node(join.node)
        if join.record.outcome is Outcome.PLAIN and join.gates:
            join.record.outcome = Outcome.ABSORBED   # until the rescaling says otherwise
    gm.graph.eliminate_dead_code()
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for join in joins:  # a shortcut module nothing calls any more goes (kept ones stay)
        if join.record.name not in called and is_shortcut(_submodule(gm, join.record.name)):
            gm.delete_submodule(join.record.name)


def _own_proj(gm: fx.GraphModule, join: Join, path: str) -> str:
    """Move a Shortcut's projection to a free path beside it, so the Shortcut can be deleted."""
    proj = gm.get_submodule(path)
    new = free_name(gm, f"{join.record.name}_proj")
    gm.add_submodule(new, proj)
    return new


def _submodule(gm: fx.GraphModule, path: str):
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None
