"""The rewiring extension point: a kind (DWA, hyper-connections) is one class in one file,
registered by name in ``ressurgeon.catalog.REWIRINGS`` (``KINDS`` reads it).

A rewiring replaces each block of a model's block list by a wrapper module (``RewiredBlock``)
that holds the original block and the new parameters. The model's own loop still calls the
blocks one after the other and passes one tensor between them; what a rewiring needs besides
(DenseFormer's earlier block outputs, the n streams of hyper-connections) crosses that loop in
a per-forward ``StreamState`` shared by the wrappers of one model:

- the first wrapper (index 0) clears the state and records the stream it receives;
- each wrapper reads what it needs, writes its own entry **keyed by its block index**
  (overwriting, never appending: a block run twice, as under gradient checkpointing's
  recompute, leaves the state as one run would);
- the last wrapper clears the state again, so no activation outlives the forward.

What a kind owns (``Rewiring``): which blocks it accepts (``check``, raising with the reason),
the wrappers it builds (``wrap``, of its class ``wrapper``), and how it folds back:
``is_initial`` (are a wrapper's new parameters still at their initial values, read from the
module or from a captured graph's tensors alike; ``at_init`` asks it for a module, so
``unwrap`` may put the original block back) and ``fold_graph`` (which of its blocks in a
captured graph ``ressurgeon.fold`` may turn back into the plain residual, exactly, given the
others, and the rewrite that does it; ``fold/rewired.py`` finds the blocks and asks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import fx

from ..catalog import REWIRINGS, rewiring_entry
from ..config import RewireConfig
from ..fold.rewired import FoldedRewire, RewireOutcome, RewireSite
from .blocks import BlockStack


class StreamState:
    """What crosses a model's layer loop during one forward: {block index: tensor(s)}.

    Not a module and never saved: a deep copy or a pickle of the model gets an empty state
    (shared by the copied wrappers, as the original is by the original's).
    """

    def __init__(self) -> None:
        self.values: dict[int, object] = {}

    def clear(self) -> None:
        self.values.clear()

    def __deepcopy__(self, memo: dict) -> "StreamState":
        new = StreamState()
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict:
        return {"values": {}}


class RewiredBlock(nn.Module):
    """A block of the model wrapped by a rewiring: ``block`` is the original module.

    Args:
        block: the original block (kept as ``self.block``; its parameters are not copied).
        index: its position in the block list; ``count``: the list's length.
        state: the StreamState the wrappers of one model share.
    """

    kind = ""

    def __init__(self, block: nn.Module, index: int, count: int, state: StreamState) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.count = count
        self._state = state

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters this wrapper added (not the block's), with their names in it."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("block.")]

    def extra_repr(self) -> str:
        return f"index={self.index}"


def split_output(out) -> tuple[torch.Tensor, tuple | None]:
    """A block's output as (the stream, the rest): transformers layers of some versions return
    a tuple whose first item is the stream."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0], tuple(out[1:])
    raise TypeError(f"a block returned {type(out).__name__}; rewire expects a tensor or a tuple "
                    "whose first item is the stream")


def join_output(stream: torch.Tensor, rest: tuple | None):
    return stream if rest is None else (stream, *rest)


class Rewiring(ABC):
    """One rewiring kind: what it accepts, what it builds, when and how it folds back."""

    name: str = ""
    wrapper: type[RewiredBlock] = RewiredBlock   # the class of the wrappers ``wrap`` builds

    def check(self, stack: BlockStack, config: RewireConfig) -> None:
        """Raise ConfigError (with the reason) when this kind cannot rewire these blocks."""

    @abstractmethod
    def wrap(self, stack: BlockStack, config: RewireConfig, state: StreamState
             ) -> list[RewiredBlock]:
        """One wrapper per block of ``stack``, in order, computing exactly what it did."""

    @abstractmethod
    def is_initial(self, params: Mapping[str, torch.Tensor], index: int) -> bool:
        """True when the new parameters of the wrapper of block ``index`` (by their names in
        the wrapper: ``weights``, ``hcs.0.static_alpha``) still hold their initial values."""

    def at_init(self, wrapper: RewiredBlock) -> bool:
        """True when the wrapper's new parameters still hold their initial values."""
        return self.is_initial(dict(wrapper.new_parameters()), wrapper.index)

    @abstractmethod
    def fold_graph(self, gm: fx.GraphModule, sites: list[RewireSite]) -> list[FoldedRewire]:
        """Turn the blocks of ``sites`` (this kind's, in graph order) that are still at their
        initial values, and that the plain residual computes exactly given the others, back
        into the plain residual in ``gm``; one record per site, kept ones with the reason."""

    def describe(self, config: RewireConfig) -> str:
        """One line for reports: the kind and its settings."""
        return self.name


def folded(site: RewireSite, gm: fx.GraphModule) -> FoldedRewire:
    """Erase a site whose outputs now read the plain values; its block's ops forget the wrapper
    (their module stacks drop its entry), so a saved graph no longer names it."""
    site.erase(gm)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack and any(p == site.path for p, _ in stack.values()):
            node.meta["nn_module_stack"] = {k: v for k, v in stack.items()
                                            if v[0] != site.path}
    return FoldedRewire(site.path, site.kind, RewireOutcome.REMOVED, None, site.param_count)


def kept(site: RewireSite, reason: str) -> FoldedRewire:
    return FoldedRewire(site.path, site.kind, RewireOutcome.KEPT, reason, site.param_count)


def plain_meta(site: RewireSite, like: fx.Node) -> dict:
    """Meta for a node fold adds to ``site``'s block: ``like``'s value and shapes, the module
    stack of the block itself."""
    meta = dict(like.meta)
    stack = like.meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = {k: v for k, v in stack.items()
                                   if not str(v[0]).startswith(site.inner_prefix + ".")}
    return meta


class _Kinds(Mapping):
    """kind name -> its Rewiring, read from ``ressurgeon.catalog.REWIRINGS`` (each kind's class
    is imported, and instantiated once, the first time it is asked for)."""

    def __init__(self) -> None:
        self._made: dict[str, Rewiring] = {}

    def __getitem__(self, name: str) -> Rewiring:
        entry = rewiring_entry(name)
        made = self._made.get(name)
        if made is None or type(made) is not entry.load():
            made = self._made[name] = entry.load()()
        return made

    def __iter__(self):
        return iter(REWIRINGS)

    def __len__(self) -> int:
        return len(REWIRINGS)


KINDS = _Kinds()
