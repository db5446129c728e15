"""Diagnostics: do gradients reach the early layers after a rewrite; which gates did training open?

``gradient_flow`` runs one forward/backward pass through the original and
the rewritten model on the same batch and the same loss, and reports each
layer's weight-gradient norm and output standard deviation side by side.
``gate_report`` reads the current value of every shortcut gate of a
rewritten (and perhaps fine-tuned) model (in ``gates.py``).
Both return plain dataclasses with ``to_dict()`` for JSON; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from ._torch import normalize_inputs, quiet_copy
from .analysis.layers import Layer, find_layers
from .config import SkipConfig, TraceOptions
from .errors import ConfigError, ShapeError, brief
from .capture.exported import as_module
from .gates import gate_report
from .registry import Role, is_getitem, role_of
from .shortcuts import is_shortcut
from .skips.surgery import SurgeryResult, rewrite_traced
from .capture.trace import trace_model

LossFn = Callable[[object, object], torch.Tensor]

# The init gradient_flow uses when given no config: "preserve" leaves the
# first step's weight gradients exactly as they were (the gates are zero), so
# it would show no difference; "standard" shows what the shortcuts do for flow.
DIAGNOSE_INIT = "standard"


@dataclass(frozen=True)
class FlowStats:
    """One layer in one model: its weight's gradient norm and its output's standard deviation.

    ``grad_norm`` is None when no gradient reached the weight (or the layer
    has none); ``act_std`` is None when the output could not be found.
    """

    grad_norm: float | None
    act_std: float | None

    def to_dict(self) -> dict:
        return {"grad_norm": self.grad_norm, "act_std": self.act_std}


@dataclass(frozen=True)
class LayerFlow:
    """One row of a gradient-flow report: a layer of the original, before and after surgery."""

    layer: str                  # layer name, as find_layers and the Skip records call it
    op: str                     # e.g. "Linear", "conv2d"
    weight: str | None          # the parameter whose gradient is measured
    original: FlowStats
    rewritten: FlowStats
    skip: str | None = None     # the shortcut that ends at this layer, if any

    @property
    def gain(self) -> float | None:
        """rewritten / original gradient norm (None when either is missing or zero)."""
        a, b = self.original.grad_norm, self.rewritten.grad_norm
        return b / a if a and b is not None else None

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "weight": self.weight,
                "original": self.original.to_dict(), "rewritten": self.rewritten.to_dict(),
                "gain": self.gain, "skip": self.skip}


@dataclass(frozen=True)
class GradientFlowReport:
    """What ``gradient_flow`` measured: one row per layer, in graph order."""

    layers: tuple[LayerFlow, ...]
    loss_original: float
    loss_rewritten: float
    skips: int                   # shortcuts in the rewritten model
    init: str | None             # the rewrite's init, when known
    mode: str                    # "train" or "eval": the mode both models ran in

    @property
    def first_gain(self) -> float | None:
        """Gradient gain of the first layer that has a gradient in both models."""
        return next((row.gain for row in self.layers if row.gain is not None), None)

    def to_dict(self) -> dict:
        return {"layers": [row.to_dict() for row in self.layers],
                "loss_original": self.loss_original, "loss_rewritten": self.loss_rewritten,
                "skips": self.skips, "init": self.init, "mode": self.mode,
                "first_gain": self.first_gain}


def gradient_flow(model: nn.Module, example_inputs: tuple, config: SkipConfig | None = None, *,
                  rewritten: nn.Module | SurgeryResult | None = None,
                  loss_fn: LossFn | None = None, target=None, train: bool = True,
                  seed: int = 0, trace: TraceOptions | None = None) -> GradientFlowReport:
    """Per-layer gradient norm and activation spread, original beside rewritten, on one batch.

    Both models run one forward and one backward pass on ``example_inputs``
    with the same loss and target; neither ``model`` nor ``rewritten`` is
    modified (each is traced into a private copy, so BatchNorm statistics and
    ``.grad`` fields stay as they were). Each row is a layer of the original
    (a weighted op with its norm and activation): the norm of its weight's
    gradient, and the standard deviation of its output as the next layer
    sees it (after the shortcut's sum with post-activation placement).

    Args:
        model: the plain network.
        example_inputs: tuple of tensors, as for torch.export (one batch).
        config: how to rewrite ``model`` when ``rewritten`` is not given;
            default ``SkipConfig(init="standard")`` (init "preserve" starts
            with closed gates, so its first gradients equal the original's).
        rewritten: compare against this instead: a SurgeryResult, or a module
            (e.g. a loaded rewritten model) whose layers and parameters carry
            the same names as ``model``'s.
        loss_fn: ``loss_fn(output, target) -> scalar``; default mean squared
            error against ``target``.
        target: what ``loss_fn`` compares the output with; default a seeded
            standard-normal tensor shaped like each output (a synthetic
            regression target).
        train: run in train mode (BatchNorm uses batch statistics, dropout is
            on, with the same seeded masks in both models); False for eval mode.
        seed: seeds the synthetic target, dropout and new projection weights.
        trace: how to capture the models (TraceOptions: leaf modules, ...).

    Returns:
        GradientFlowReport; ``report.first_gain`` is the first layer's
        rewritten/original gradient ratio.

    Raises:
        TraceError, ShapeError: a model cannot be captured or rejects the inputs
            (in train mode, BatchNorm needs more than one value per channel).
        ConfigError: ``loss_fn`` failed or returned something other than a scalar.

    Example:
        >>> report = gradient_flow(deep_mlp, (torch.randn(16, 32),))    # doctest: +SKIP
        >>> report.first_gain > 10   # a deep plain MLP at default init  # doctest: +SKIP
        True
    """
    inputs = normalize_inputs(example_inputs)
    model = as_module(model)
    original = trace_model(model, inputs, trace)
    if rewritten is None:
        config = config or SkipConfig(init=DIAGNOSE_INIT)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # projection weights: the same report on every run
            result = rewrite_traced(quiet_copy(original), inputs, config)
        other, skips, init = result.module, result.skips, config.init.value
    elif isinstance(rewritten, SurgeryResult):
        other = trace_model(rewritten.module, inputs, trace)
        skips, init = rewritten.skips, rewritten.plan.config.init.value
    else:
        other = trace_model(rewritten, inputs, trace)
        skips = gate_report(other).gates
        inits = {g.init for g in skips}
        init = inits.pop() if len(inits) == 1 else None
    skip_ends = {s.target_layer: s.name for s in skips}

    layers = find_layers(original)
    before, loss_a, target = _measure(original, layers, inputs, loss_fn, target, train, seed)
    after, loss_b, _ = _measure(other, layers, inputs, loss_fn, target, train, seed)
    rows = tuple(LayerFlow(layer=lay.name, op=lay.op, weight=before[lay.name][0],
                           original=before[lay.name][1], rewritten=after[lay.name][1],
                           skip=skip_ends.get(lay.name))
                 for lay in layers)
    return GradientFlowReport(layers=rows, loss_original=loss_a, loss_rewritten=loss_b,
                              skips=len(skips), init=init,
                              mode="train" if train else "eval")


class _ActivationRecorder(fx.Interpreter):
    """Runs the graph with autograd on and keeps the std of the watched nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, watch: set[str]):
        super().__init__(gm)
        self.extra_traceback = False
        self.watch = watch
        self.stds: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ShapeError(f"the model failed at {n.format_node()}: {brief(exc)}"
                             + ("; in train mode BatchNorm needs a batch of 2 or more "
                                "(or pass train=False)" if "more than 1 value" in str(exc)
                                else "")) from exc
        if n.name in self.watch and isinstance(result, torch.Tensor) and result.numel() > 1:
            self.stds[n.name] = result.detach().double().std().item()
        return result


def _measure(gm: fx.GraphModule, layers: list[Layer], inputs: tuple, loss_fn: LossFn | None,
             target, train: bool, seed: int):
    """{layer: (weight name, FlowStats)}, the loss, and the target used."""
    located = _locate(gm, layers)
    outs = {name: out.name for name, (_, out) in located.items() if out is not None}
    weights = {name: _weight_name(gm, anchor) for name, (anchor, _) in located.items()}
    params = dict(gm.named_parameters())
    for p in params.values():
        p.grad = None
    gm.train(train)
    recorder = _ActivationRecorder(gm, set(outs.values()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout masks in both models
        output = recorder.run(*inputs)
    if target is None:
        target = _synthetic_target(output, seed)
    loss = _loss(loss_fn, output, target)
    loss.backward()
    stats = {}
    for lay in layers:
        weight = weights.get(lay.name)
        grad = params[weight].grad if weight in params else None
        stats[lay.name] = (weight, FlowStats(
            grad_norm=None if grad is None else grad.double().norm().item(),
            act_std=recorder.stds.get(outs.get(lay.name))))
    for p in params.values():
        p.grad = None
    return stats, loss.item(), target


def _locate(gm: fx.GraphModule, layers: list[Layer]) -> dict[str, tuple]:
    """{layer name: (weighted-op node, output node as the next layer sees it)} in ``gm``.

    A graph that add_skips rewrote keeps the original's node names; another one
    (e.g. reloaded from a .pt2 archive) is matched by layer name, stepping past
    the inlined shortcut that now sits between a layer's op and its activation.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    if all(lay.anchor in nodes and lay.out in nodes for lay in layers):
        return {lay.name: (nodes[lay.anchor], _past_shortcut(nodes[lay.out], modules, False))
                for lay in layers}
    own = {lay.name: lay for lay in find_layers(gm, modules)}
    located: dict[str, tuple] = {}
    for lay in layers:
        mine = own.get(lay.name)
        located[lay.name] = ((None, None) if mine is None else
                             (nodes[mine.anchor], _past_shortcut(nodes[mine.out], modules, True)))
    return located


def _past_shortcut(node: fx.Node, modules: dict, then_activation: bool) -> fx.Node:
    """The shortcut's sum when one consumes ``node`` as its span output, else ``node``.

    With ``then_activation`` (a reloaded model, where the sum sits between a
    layer's norm and its activation), the activation after that sum.
    """
    start = node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or not is_shortcut(modules.get(user.target)) \
                or user.args[0] is not node:
            break
        node = user
    if node is start or not then_activation or len(node.users) != 1:
        return node
    user = next(iter(node.users))
    return user if role_of(user, modules) is Role.ACTIVATION else node


def _weight_name(gm: fx.GraphModule, node: fx.Node | None) -> str | None:
    """The parameter a layer's weighted op multiplies by (its ``weight``), by name."""
    if node is None:
        return None
    if is_getitem(node):  # attention returns (out, weights): the op is the getitem's input
        node = node.args[0]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        own = dict(module.named_parameters(recurse=False))
        for key in ("weight", "in_proj_weight", *own):
            if key in own:
                return f"{node.target}.{key}" if node.target else key
        return None
    for arg in node.args[1:]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            try:
                gm.get_parameter(arg.target)
            except AttributeError:
                continue
            return arg.target
    return None


def _synthetic_target(output, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def fake(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
        return t

    return pytree.tree_map(fake, output)


def _loss(loss_fn: LossFn | None, output, target) -> torch.Tensor:
    if loss_fn is None:
        outs, targets = pytree.tree_leaves(output), pytree.tree_leaves(target)
        if len(outs) != len(targets):
            raise ConfigError(f"the model returns {len(outs)} value(s) but target holds "
                              f"{len(targets)}; give one target per output, or pass loss_fn")
        pairs = zip(outs, targets, strict=True)
        terms = [F.mse_loss(o.float(), t.float()) for o, t in pairs
                 if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if not terms:
            raise ConfigError("the model returns no floating-point tensor to take a loss of; "
                              "pass loss_fn")
        return torch.stack(terms).sum()
    try:
        loss = loss_fn(output, target)
    except Exception as exc:
        raise ConfigError(f"loss_fn failed: {type(exc).__name__}: {brief(exc)}") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ConfigError("loss_fn must return a scalar tensor that depends on the model's "
                          f"output, got {type(loss).__name__}"
                          + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                             else ""))
    return loss.reshape(())
