"""Train/eval behaviour through a capture: which layers keep it, which lose it.

Tracing runs ``forward`` once, in the mode the model is in, and bakes every
``if self.training`` branch. Two rules keep the result training like the original:

- a weightless module whose forward reads ``self.training`` (timm's ``DropPath``,
  torchvision's ``StochasticDepth``, a hand-written dropout) stays a leaf of the
  fx graph (``keeps_mode``): it is called as the module it is, in the result's mode;
- a functional dropout inside a module with weights (``F.dropout(x, p,
  training=self.training)``, as attention layers write it) is found by tracing
  the model in the other mode too: where the two graphs differ only in a
  dropout's arguments, the call becomes an ``nn.Dropout`` module
  (``modules_for_mode_calls``); any other difference names its module in
  ``CaptureInfo.mode_baked``, as the torch.export path does for the layers it inlines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from .._fx import swap_for_module

# functional dropouts (input, p, training, inplace) -> the module that follows .train()
DROPOUTS: dict[Callable, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}


def keeps_mode(module: nn.Module) -> bool:
    """True for a weightless module whose forward reads ``self.training``: it stays a leaf.

    Read from the forward's code object (its attribute names), nothing is run;
    modules with weights are traced through (their layers are where shortcuts
    go), and ``torch.nn``'s own are leaves already.
    """
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or "training" not in code.co_names or type(module).__module__.startswith(
            "torch.nn"):
        return False
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def reads_mode(model: nn.Module) -> bool:
    """True when some module traced through (not torch.nn's) reads ``self.training``."""
    for m in model.modules():
        code = getattr(getattr(type(m), "forward", None), "__code__", None)
        if (code is not None and "training" in code.co_names
                and not type(m).__module__.startswith("torch.nn") and not keeps_mode(m)):
            return True
    return False


@contextlib.contextmanager
def flipped_mode(model: nn.Module) -> Iterator[bool]:
    """Every module in the other mode than ``model``'s for the block; each one's own after."""
    modes = {m: m.training for m in model.modules()}
    other = not model.training
    for m in modes:
        m.training = other
    try:
        yield other
    finally:
        for m, mode in modes.items():
            m.training = mode


def modules_for_mode_calls(gm: fx.GraphModule, other: fx.GraphModule, other_training: bool
                           ) -> tuple[str, ...]:
    """Turn functional dropouts that follow ``self.training`` into modules; name what else differs.

    Args:
        gm: the capture (edited in place).
        other: the same model traced in the other mode.
        other_training: the mode ``other`` was traced in.

    Returns:
        The module paths whose graph differs between the modes in another way
        (their train-mode behaviour is the capture mode's).
    """
    mine, theirs = list(gm.graph.nodes), list(other.graph.nodes)
    if len(mine) != len(theirs) or any(a.op != b.op or a.target != b.target
                                       for a, b in zip(mine, theirs)):
        return _differing_modules(mine, theirs)
    baked = []
    differing = [(node, twin) for node, twin in zip(mine, theirs)
                 if (_plain(node.args), _plain(node.kwargs)) != (_plain(twin.args),
                                                                _plain(twin.kwargs))]
    for node, twin in differing:  # compared first: a swap renames the nodes that follow
        if node.op == "call_function" and node.target in DROPOUTS:
            train_args = twin if other_training else node
            p = _argument(train_args, "p", 1, 0.5)
            if isinstance(p, (int, float)):
                x = node.args[0] if node.args else node.kwargs["input"]
                owner = _owner(node)
                swap_for_module(gm, node, DROPOUTS[node.target](float(p)), (x,),
                                f"{owner}.dropout" if owner else "dropout")
                continue
        baked.append(_owner(node))
    gm.graph.lint()
    gm.recompile()
    return tuple(dict.fromkeys(b for b in baked if b))


def _argument(node: fx.Node, name: str, index: int, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _plain(value, names: bool = True):
    """Arguments compared by node name (the two graphs hold distinct node objects), or with
    every node as one marker (``names=False``: only the constants are compared)."""
    return fx.node.map_aggregate(value, lambda v: (("node", v.name) if names else "node")
                                 if isinstance(v, fx.Node) else v)


def _owner(node: fx.Node) -> str:
    """The path of the module whose forward made the node ("" for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]  # a module call's stack ends with the module itself
    return paths[-1] if paths else ""


def _differing_modules(mine: list[fx.Node], theirs: list[fx.Node]) -> tuple[str, ...]:
    """The modules whose own nodes differ between the two graphs (compared module by module:
    once the sequences part, node names no longer match, so the ops and their constant
    arguments are compared)."""
    def by_owner(nodes: list[fx.Node]) -> dict[str, list]:
        groups: dict[str, list] = {}
        for node in nodes:
            groups.setdefault(_owner(node), []).append(
                (node.op, str(node.target), _plain(node.args, names=False),
                 _plain(node.kwargs, names=False)))
        return groups

    a, b = by_owner(mine), by_owner(theirs)
    owners = [o or "(the model)" for o in dict.fromkeys([*a, *b]) if a.get(o) != b.get(o)]
    return tuple(owners) or ("(the model)",)

