"""DenseFormer's depth-weighted average (Pagliardini et al., NeurIPS 2024), as a rewiring.

Block i (1-based) reads ``X_{i-1}`` and writes ``Y_i = B_i(X_{i-1})``; ``Y_0`` is the stream
that enters the first block (the embedding). After block i the stream becomes

    X_i = sum_j alpha_ij * Y_j,   j in {0..i} with (i - j) divisible by the dilation k,

at the blocks where i is a multiple of the period p (elsewhere ``X_i = Y_i``). With
``alpha_ii = 1`` and every other weight 0 this is exactly the original network (1*y and 0*y
are exact in IEEE arithmetic for finite y, and adding exact zeros changes nothing), in any
dtype, for pre-norm and post-norm blocks alike: a block is a black box here. The paper's
cheaper setting is k=4, p=5 ("4x5-DenseFormer").

Fold: a block whose weights are still (0, ..., 0, 1) averages nothing in, whatever the other
blocks hold, so in a captured graph its average's output is replaced by its own output Y_i and
the average's ops go (the earlier outputs stay wherever a trained average reads them).

The sum is accumulated term by term, so autograd keeps references to the Y_j that the model
holds anyway, not a stacked copy per average. Only the Y_j some later average reads are kept
in the state.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from collections.abc import Mapping

from torch import fx

from ..config import RewireConfig
from ..fold.rewired import FoldedRewire, RewireSite
from .base import (RewiredBlock, Rewiring, StreamState, folded, join_output, kept,
                   split_output)
from .blocks import BlockStack


def sources(i: int, config: RewireConfig) -> list[int] | None:
    """The outputs Y_j the average after block i (1-based) reads, or None for no average."""
    if i % config.period:
        return None
    return [j for j in range(i + 1) if (i - j) % config.dilation == 0]


class DWABlock(RewiredBlock):
    """A block followed by a depth-weighted average of earlier block outputs.

    ``weights[m]`` multiplies ``Y_{sources[m]}``; the last source is this block's own output.
    ``keep``: whether some later average reads this block's output (so the state holds it).
    """

    kind = "dwa"

    def __init__(self, block: nn.Module, index: int, count: int, state: StreamState,
                 srcs: list[int] | None, keep: bool, keep_input: bool) -> None:
        super().__init__(block, index, count, state)
        self.sources = srcs
        self.keep = keep
        self.keep_input = keep_input
        if srcs is not None:
            like = next(block.parameters(), None)
            dtype = like.dtype if like is not None and like.is_floating_point() else None
            device = like.device if like is not None else None
            init = torch.zeros(len(srcs), dtype=dtype, device=device)
            init[-1] = 1.0
            self.weights = nn.Parameter(init)
        else:
            self.register_parameter("weights", None)

    def forward(self, hidden, *args, **kwargs):
        seen = self._state.values
        if self.first:
            self._state.clear()
            if self.keep_input:
                seen[0] = hidden
        y, rest = split_output(self.block(hidden, *args, **kwargs))
        if self.keep:
            seen[self.index + 1] = y
        if self.sources is not None:
            out = None
            for w, j in zip(self.weights.to(y.dtype), self.sources):
                term = w * (y if j == self.index + 1 else seen[j])
                out = term if out is None else out + term
            y = out
        if self.last:
            self._state.clear()
        return join_output(y, rest)

    def extra_repr(self) -> str:
        return f"index={self.index}, sources={self.sources}"


class DWA(Rewiring):
    """The depth-weighted average: a black-box rewiring, exact at insertion for any block."""

    name = "dwa"
    wrapper = DWABlock

    def wrap(self, stack: BlockStack, config: RewireConfig, state: StreamState
             ) -> list[RewiredBlock]:
        count = len(stack.container)
        plan = [sources(i, config) for i in range(1, count + 1)]
        read = {j for srcs in plan if srcs for j in srcs[:-1]}   # outputs read later
        return [DWABlock(block, k, count, state, plan[k], keep=(k + 1) in read,
                         keep_input=0 in read)
                for k, block in enumerate(stack.blocks)]

    def is_initial(self, params: Mapping[str, torch.Tensor], index: int) -> bool:
        w = params.get("weights")
        if w is None:
            return True
        init = torch.zeros_like(w)
        init[-1] = 1.0
        return bool(torch.equal(w.detach(), init))

    def fold_graph(self, gm: fx.GraphModule, sites: list[RewireSite]) -> list[FoldedRewire]:
        records = []
        for site in sites:
            if not self.is_initial(site.params, site.index):
                records.append(kept(site, "its weights moved from (0, ..., 0, 1): the average "
                                    "mixes earlier outputs in"))
                continue
            outs, ys = site.to_outside(), site.from_inner()
            if site.own and (len(outs) != 1 or len(ys) != 1):
                records.append(kept(site, f"its average reads {len(ys)} value(s) of its block "
                                    f"and gives {len(outs)}, not one each: not the graph a "
                                    "DWA block exports to"))
                continue
            if site.own:   # the average of Y_i alone, weight 1: Y_i
                outs[0].replace_all_uses_with(ys[0])
            records.append(folded(site, gm))
        return records

    def describe(self, config: RewireConfig) -> str:
        return f"dwa (dilation {config.dilation}, period {config.period})"

