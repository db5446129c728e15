"""Fold: a rewritten model -> an inference model with the same function and fewer ops.

Like PEFT's ``merge_and_unload``, for deployment. On a copy of the model, in
this order:

1. (``fold_layers.py``) ``aten`` convolutions and linears (graphs loaded from ``.pt2``) become
   modules again, and shortcuts flattened by torch.export are recognised from
   their ``nn_module_stack`` (``ressurgeon.shortcuts.Shortcut``).
2. BatchNorm (eval statistics) is folded into the conv/linear before it;
   Dropout and Identity modules are dropped (eval behaviour).
3. Each shortcut becomes a sum of *terms* ``c * P(v)`` (P an optional
   projection, c a gate or 1). A term whose gate is exactly 0 is dropped:
   ``preserve`` with a = 0 leaves ``h``; ``rezero`` with a = 0 leaves ``S(x)``,
   so the whole span goes (it is not the shortcut that is removable there).
4. A shortcut around one linear layer (``h = conv(x)`` after BN folding, e.g.
   ``span=1`` with pre-activation placement) is merged into that conv:
   ``W' = c_h W + c_x E``, E an identity (Dirac) kernel or the 1x1 projection
   placed at the tap that reads the same pixel, as RepVGG and DiracNets do.
5. Gates left are absorbed by rescaling where that is exact: each tensor is
   stored as ``true / s`` for a scalar s; convs/linears absorb any s in their
   weights, ReLU and max-pooling carry a positive s, linear reshapes any s.
   ``h + a*x`` becomes ``h' + x`` with ``h'`` = ``h/a`` from its conv and the
   stream stored at scale a until the next conv/linear takes it back. A gate
   whose scale would reach an op that needs the true values (the output,
   LayerNorm, a sigmoid, a negative scale into a ReLU) stays as a Mul, and the
   report says where.

Only eval-mode inference makes sense for the result (BatchNorm is gone); it
is returned in eval mode. The result is exact up to float rounding; a NaN or
Inf that a zero gate used to multiply away is not reproduced.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import ShapeError, VerificationError
from .rescale import (
    CONVS,
    absorb_gates,
    call_counts,
    editable_layer,
    in_table,
    op_key,
    set_param,
)
from .fold_layers import attr, drop_identities, fold_batchnorms, lift_weighted_ops
from .shortcuts import Shortcut, exported_shortcut_path
from .verify import eval_outputs
from .trace import (
    META,
    free_name,
    normalize_inputs,
    plain_graph_module,
    propagate_shapes,
    trace_model,
)

aten = torch.ops.aten

# Tolerance of fold against the unfolded model, relative to the output scale
# (max(1, max |output|)): folding BN and merging kernels reorders float sums.
FOLD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2,
             torch.float16: 1e-2}
# activations ONNX Runtime fuses after Conv + Add (conv_add_act_fusion.cc)
_FUSED_ACTS = {nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid,
               F.relu, torch.relu, torch.sigmoid, torch.tanh, F.leaky_relu, F.hardtanh,
               F.relu6, F.hardsigmoid, aten.relu.default, aten.sigmoid.default,
               aten.tanh.default, aten.leaky_relu.default, aten.hardtanh.default, "relu"}


@dataclass
class FoldedSkip:
    """What fold did with one shortcut.

    ``outcome`` is one of: ``removed`` (gate exactly 0: the sum is the span's
    output), ``span-removed`` (rezero gate exactly 0: the block is its shortcut
    alone), ``merged`` (into the span's conv/linear weights), ``absorbed`` (the
    gate went into weights, a plain Add remains), ``plain`` (no gate: a plain
    Add remains), ``kept`` (the gate stays as a Mul; ``reason`` says why).
    For other outcomes ``reason``, when set, says why a shortcut around one
    layer could not be merged into it.
    ``fusion`` is ``"conv+add+act"`` or ``"conv+add"`` when ONNX Runtime and
    TensorRT can fuse the Add into the convolution before it, else None.
    """

    name: str
    kind: str                   # identity | projection
    init: str                   # preserve | standard | rezero
    gate: float | None
    outcome: str = "plain"
    reason: str | None = None
    fusion: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FoldResult:
    """The folded model and what happened to each shortcut (eval mode only)."""

    module: fx.GraphModule
    skips: list[FoldedSkip]
    batchnorms_folded: list[str]
    ops_before: int
    ops_after: int
    max_abs_diff: float | None = None   # against the unfolded model, when inputs were given
    tolerance: float | None = None
    eval_only: bool = True              # BatchNorm used its running statistics

    @property
    def fusion_eligible(self) -> int:
        return sum(s.fusion is not None for s in self.skips)

    @property
    def gates_kept(self) -> dict[str, str]:
        return {s.name: s.reason or "" for s in self.skips if s.outcome == "kept"}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skips:
            out[s.outcome] = out.get(s.outcome, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"skips": [s.to_dict() for s in self.skips], "counts": self.counts(),
                "batchnorms_folded": self.batchnorms_folded, "ops_before": self.ops_before,
                "ops_after": self.ops_after, "fusion_eligible": self.fusion_eligible,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "eval_only": self.eval_only}


def fold(module: nn.Module, example_inputs: tuple | None = None, *,
         fold_batchnorm: bool = True) -> FoldResult:
    """Fold shortcuts, BatchNorm and gates into the weights for inference.

    Args:
        module: the result of ``add_skips`` (``result.module``), a GraphModule
            loaded from a ``.pt2`` that ``add-skips`` wrote, or any nn.Module
            (traced first; then ``example_inputs`` is needed). Not modified.
        example_inputs: tuple of tensors; when given, the folded model is
            checked against the unfolded one (eval mode) and shapes are known,
            which Linear + BatchNorm1d folding needs.
        fold_batchnorm: fold eval-mode BatchNorm into the conv/linear before it.
            Merging and most gate absorption need it.

    Returns:
        FoldResult: ``.module`` (a new GraphModule in eval mode), one FoldedSkip
        per shortcut, the BatchNorms folded, op counts before and after.

    Raises:
        TraceError, ShapeError: ``module`` is not a GraphModule and cannot be traced.
        VerificationError: the folded model's outputs moved beyond ``FOLD_RTOL``
            (a ressurgeon bug).

    Example:
        >>> result = add_skips(model, (x,), SkipConfig(span=1))        # doctest: +SKIP
        >>> folded = fold(result.module, (x,))                          # doctest: +SKIP
        >>> [s.outcome for s in folded.skips]                           # doctest: +SKIP
        ['merged', 'merged', 'absorbed']
    """
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
    if isinstance(module, fx.GraphModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree specs of exported graphs
            gm = copy.deepcopy(module)
        if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
            gm = plain_graph_module(gm)   # ep.module() refuses .eval()
    elif inputs is None:
        raise ShapeError(f"fold needs example inputs to trace a {type(module).__name__}; "
                         "pass example_inputs or the GraphModule from add_skips")
    else:
        gm = trace_model(module, inputs)
    gm.eval()
    if inputs is not None and not _has_shapes(gm):
        propagate_shapes(gm, inputs)
    ops_before = _count_ops(gm)
    lift_weighted_ops(gm)
    folded_bn = fold_batchnorms(gm) if fold_batchnorm else []
    drop_identities(gm)
    joins = _collect_joins(gm)
    _drop_zero_terms(joins)
    _merge_linear(gm, joins)
    _emit(gm, joins)
    _absorb(gm, joins)
    _mark_fusion(gm, joins)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    result = FoldResult(module=gm, skips=[j.record for j in joins], batchnorms_folded=folded_bn,
                        ops_before=ops_before, ops_after=_count_ops(gm))
    if inputs is not None:
        _verify(module, result, inputs)
    return result


# -- graph helpers ------------------------------------------------------------------------

def _count_ops(gm: fx.GraphModule) -> int:
    """Ops a runtime executes; a Shortcut module counts as its Add, Mul and projection."""
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), Shortcut):
            count += 1 + (m.gate is not None) + (m.kind == "projection")
        elif n.op in ("call_module", "call_function", "call_method"):
            count += 1
    return count


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(META in n.meta or "val" in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def _drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers nothing reads any more (a .pt2's gates, BN statistics)."""
    nodes = gm.graph.nodes
    used = {str(n.target) for n in nodes if n.op in ("call_module", "get_attr")}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        parts = name.split(".")
        if any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
            continue
        owner, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, leaf)


# -- 3. shortcuts as sums of terms --------------------------------------------------------------

@dataclass
class _Term:
    node: fx.Node                 # the value the term reads
    proj: str | None              # submodule path of its projection
    coef: float                   # its gate (1.0 without one)


@dataclass
class _Join:
    node: fx.Node                 # the node whose value is the sum
    terms: list[_Term]
    record: FoldedSkip
    internal: list[fx.Node] = field(default_factory=list)   # exported: its mul/proj nodes
    shortcut: bool = False        # a Shortcut module call (its proj lives at path.proj)
    add: fx.Node | None = None    # the emitted Add
    gates: dict = field(default_factory=dict)               # emitted Mul node -> gate


def _collect_joins(gm: fx.GraphModule) -> list[_Join]:
    modules = dict(gm.named_modules())
    joins: list[_Join] = []
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Shortcut) and len(node.args) == 2:
            joins.append(_shortcut_join(node, module))
            continue
        path = exported_shortcut_path(node)
        if path is not None:
            groups.setdefault(path, []).append(node)
    for path, nodes in groups.items():
        join = _exported_join(gm, path, nodes, modules)
        if join is not None:
            joins.append(join)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    joins.sort(key=lambda j: order[j.node])
    return joins


def _shortcut_join(node: fx.Node, module: Shortcut) -> _Join:
    h, x = node.args
    proj = None if module.kind == "identity" else f"{node.target}.proj"
    gate = None if module.gate is None else float(module.gate.detach())
    if module.init == "preserve":
        terms = [_Term(h, None, 1.0), _Term(x, proj, gate)]
    elif module.init == "rezero":
        terms = [_Term(x, proj, 1.0), _Term(h, None, gate)]
    else:
        terms = [_Term(h, None, 1.0), _Term(x, proj, 1.0)]
    record = FoldedSkip(name=str(node.target), kind=module.kind, init=module.init, gate=gate)
    return _Join(node=node, terms=terms, record=record, shortcut=True)


def _exported_join(gm: fx.GraphModule, path: str, nodes: list[fx.Node],
                   modules: dict) -> _Join | None:
    """``add(A, mul(gate, B))`` or ``add(A, B)``, A/B optionally through ``path.proj``."""
    inside = set(nodes)
    adds = [n for n in nodes if n.target in (aten.add.Tensor, operator.add, torch.add)
            and not n.kwargs and all(u not in inside for u in n.users)]
    if len(adds) != 1 or len(adds[0].args) != 2:
        return None
    add, terms, gate, gated = adds[0], [], None, None
    for arg in add.args:
        coef, node, proj = 1.0, arg, None
        if not isinstance(node, fx.Node):
            return None
        if node in inside and node.target in (aten.mul.Tensor, operator.mul, torch.mul):
            params = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                      and str(a.target) == f"{path}.gate"]
            others = [a for a in node.args if a not in params]
            if len(params) != 1 or len(others) != 1 or not isinstance(others[0], fx.Node):
                return None
            gate = coef = float(attr(gm, params[0].target).detach())
            gated, node = len(terms), others[0]
        if node in inside and node.op == "call_module" and str(node.target).startswith(path) \
                and isinstance(modules.get(node.target), (*CONVS, nn.Linear)):
            proj, node = str(node.target), node.args[0]
        if node in inside:
            return None
        terms.append(_Term(node, proj, coef))
    projected = [t.proj is not None for t in terms]
    if gate is None:
        init = "standard"
    elif projected[gated]:
        init = "preserve"
    elif any(projected):
        init = "rezero"
    else:
        # identity: the gated operand is x (preserve, h + a*x) or h (rezero, x + a*h);
        # the span's output h always comes after its input x in graph order
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        later = max((t.node for t in terms), key=order.__getitem__)
        init = "rezero" if terms[gated].node is later else "preserve"
    record = FoldedSkip(name=path, kind="projection" if any(projected) else "identity",
                        init=init, gate=gate)
    return _Join(node=add, terms=terms, record=record,
                 internal=[n for n in nodes if n is not add])


# -- 4. zero gates and merges -------------------------------------------------------------------

def _drop_zero_terms(joins: list[_Join]) -> None:
    for join in joins:
        kept = [t for t in join.terms if t.coef != 0.0]
        if len(kept) == len(join.terms):
            continue
        join.terms = kept
        join.record.outcome = "span-removed" if join.record.init == "rezero" else "removed"


def _merge_linear(gm: fx.GraphModule, joins: list[_Join]) -> None:
    modules, calls = dict(gm.named_modules()), call_counts(gm)
    for join in joins:
        if len(join.terms) != 2:
            continue
        for h, u in (join.terms, join.terms[::-1]):
            layer = editable_layer(h.node, modules, calls, (*CONVS, nn.Linear))
            if (layer is None or h.proj is not None or h.node.args[0] is not u.node
                    or any(user is not join.node and user not in join.internal
                           for user in h.node.users)):
                continue
            proj = modules.get(f"{u.proj}") if u.proj else None
            embedded, why = _embed(layer, proj)
            if embedded is None:
                join.record.reason = why
                continue
            w = layer.weight.double() * h.coef + embedded * u.coef
            set_param(layer, "weight", w, layer.weight)
            if layer.bias is not None:
                set_param(layer, "bias", layer.bias.double() * h.coef, layer.weight)
            join.node.replace_all_uses_with(h.node)
            _rebind(joins, join.node, h.node)
            join.terms = []
            join.record.outcome, join.record.reason = "merged", None
            break


def _embed(layer: nn.Module, proj: nn.Module | None) -> tuple[torch.Tensor | None, str | None]:
    """The shortcut as a kernel of ``layer``'s shape (float64), or None and why not."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        if proj is None:
            if w.shape[0] != w.shape[1]:
                return None, "identity around a Linear that changes width"
            return torch.eye(w.shape[0], dtype=torch.float64, device=w.device), None
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            return None, "projection is not a bias-free Linear"
        return proj.weight.double(), None
    k, dims = tuple(w.shape[2:]), w.dim() - 2
    stride, pad, dil = (_tuple(getattr(layer, a), dims) for a in ("stride", "padding", "dilation"))
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return None, f"padding={layer.padding!r}"
    if any(p % d for p, d in zip(pad, dil)) or any(p // d >= kk for p, d, kk in zip(pad, dil, k)):
        return None, "no kernel tap reads the shortcut's pixel (padding vs kernel size)"
    tap = tuple(p // d for p, d in zip(pad, dil))
    out = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    if proj is None:
        if w.shape[0] != layer.in_channels or any(s != 1 for s in stride):
            return None, "identity around a conv that changes channels or stride"
        per_group = w.shape[1]
        for o in range(w.shape[0]):
            out[(o, o % per_group, *tap)] = 1.0
        return out, None
    if (not isinstance(proj, CONVS) or proj.bias is not None or layer.groups != 1
            or proj.groups != 1 or any(p for p in _tuple(proj.padding, dims))
            or _tuple(proj.stride, dims) != stride or tuple(proj.weight.shape[2:]) != (1,) * dims):
        return None, "projection stride/padding/groups do not match the conv"
    out[(slice(None), slice(None), *tap)] = proj.weight.double().reshape(w.shape[:2])
    return out, None


def _tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, str):
        return (0,) * dims
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


# -- 5. emit sums as plain ops, then absorb gates by rescaling -----------------------------------------

def _emit(gm: fx.GraphModule, joins: list[_Join]) -> None:
    """Every join becomes ``add(c1*P1(v1), c2*P2(v2))`` with explicit proj calls and Muls."""
    for join in joins:
        if join.record.outcome == "merged":
            continue
        values = []
        with gm.graph.inserting_before(join.node):
            for term in join.terms:
                value = term.node
                if term.proj is not None:
                    path = _own_proj(gm, join, term.proj)
                    value = gm.graph.call_module(path, (value,))
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
            out.meta[META] = dict(join.node.meta[META])
        join.node.replace_all_uses_with(out)
        _rebind(joins, join.node, out)
        if join.shortcut:
            gm.graph.erase_node(join.node)
        if join.record.outcome == "plain" and join.gates:
            join.record.outcome = "absorbed"   # until _absorb says otherwise
    gm.graph.eliminate_dead_code()
    for join in joins:
        if join.shortcut:
            # the Shortcut module goes; its projection (if used) took its path
            try:
                if not isinstance(gm.get_submodule(join.record.name), Shortcut):
                    continue
            except AttributeError:
                continue
            gm.delete_submodule(join.record.name)


def _absorb(gm: fx.GraphModule, joins: list[_Join]) -> None:
    gates = {mul: g for join in joins for mul, g in join.gates.items()}
    if not gates:
        return
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    kept = absorb_gates(gm, gates, {j.add for j in joins if j.add is not None}, dtype)
    for join in joins:
        reasons = [kept[m] for m in join.gates if m in kept]
        if reasons:
            join.record.outcome, join.record.reason = "kept", reasons[0]


def _rebind(joins: list[_Join], old: fx.Node, new: fx.Node) -> None:
    """Later shortcuts that read a replaced sum (post-activation chains) read its replacement."""
    for join in joins:
        for term in join.terms:
            if term.node is old:
                term.node = new


def _own_proj(gm: fx.GraphModule, join: _Join, path: str) -> str:
    if not join.shortcut:
        return path
    # move Shortcut.proj to a free path beside it, so the Shortcut can be deleted
    proj = gm.get_submodule(path)
    new = free_name(gm, f"{join.record.name}_proj")
    gm.add_submodule(new, proj)
    return new


# -- fusion -------------------------------------------------------------------------------------

def _mark_fusion(gm: fx.GraphModule, joins: list[_Join]) -> None:
    """Which Adds follow a conv with bias (ORT/TensorRT fuse them); give bias-free convs a zero bias."""
    modules, calls = dict(gm.named_modules()), call_counts(gm)
    for join in joins:
        add = join.add
        if add is None:
            continue
        conv = None
        for arg in add.args:
            layer = editable_layer(arg, modules, calls, (nn.Conv2d,)) if isinstance(arg, fx.Node) else None
            if layer is not None and len(arg.users) == 1:
                conv = layer
                break
        if conv is None:
            continue
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device),
                                     requires_grad=conv.weight.requires_grad)
        users = list(add.users)
        act = len(users) == 1 and in_table(op_key(users[0], modules), _FUSED_ACTS)
        join.record.fusion = "conv+add+act" if act else "conv+add"


# -- verification -------------------------------------------------------------------------------

def _verify(original: nn.Module, result: FoldResult, inputs: tuple) -> None:
    a, b = eval_outputs(original, inputs), eval_outputs(result.module, inputs)
    worst, tol = 0.0, 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            raise VerificationError(f"fold changed an output's shape from {tuple(x.shape)} to "
                                    f"{tuple(y.shape)}; this is a ressurgeon bug")
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
            bound = max(1.0, x.double().abs().max().item())
            tol = max(tol, FOLD_RTOL.get(x.dtype, 1e-4) * bound)
    result.max_abs_diff, result.tolerance = worst, tol
    if not worst <= tol:
        raise VerificationError(f"the folded model's outputs differ by {worst:.3g} (tolerance "
                                f"{tol:.3g}); this is a ressurgeon bug, please report it")
