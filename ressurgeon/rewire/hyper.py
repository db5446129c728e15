"""Hyper-connections (Zhu et al., ICLR 2025), as a rewiring; mHC's doubly-stochastic variant.

The stream is widened to n copies ``H = (h_1..h_n)``. Each sublayer f of a pre-norm block
(attention, MLP) gets a hyper-connection with static weights ``a_m`` (n: how it reads the
streams), ``A_r`` (n x n: how the streams carry over) and ``b`` (n: how it writes back):

    x    = sum_k a_m[k] h_k
    y    = f(norm(x))
    h'_i = sum_j A_r[j, i] h_j + b[i] * y

and the dynamic form adds input-dependent terms ``s * tanh(norm(H) W)`` to a_m, A_r and b. At
insertion ``a_m = e_(l mod n)`` (sublayer l reads one stream), ``A_r = I``, ``b = 1`` and the
dynamic W are 0, the first block copies the stream it receives n times, and the last block
returns the read-out ``h_1 + sum_i (h_i - h_1) / n``. Every stream then holds exactly the
original stream ``h + y``: ``1*h + 0*h'`` and ``1*y`` are exact, the add is the one the block
made (``h + y``, commutative), and the read-out of n equal streams is exact for every n (the
mean is not: ``(h+h+h)/3 != h`` for some h). This needs the block's sublayers, so the wrapper
runs them itself (``blocks.FORMS``) instead of the block's forward, and the model must be
pre-norm; inputs must be finite (``0 * inf`` is NaN).

Fold: while blocks 0..m-1 are all at init, the n streams stay n equal copies of the plain
stream h, each sublayer reads h and each update is ``h + y``; in a captured graph fold rewires
those blocks' sublayers to read h and adds ``h + y`` as the block did, and block m (the first
whose hyper-connections moved) receives ``h`` expanded to n streams, as block 0 made them. A
block at init after a moved one is kept: its streams differ, so its plain form would compute
something else. mHC is never folded (its mixing is not exactly the identity).

mHC (``mhc=True``, DeepSeek 2026): ``A_r`` is the Sinkhorn projection of ``exp(logits)`` onto
the doubly stochastic matrices (20 iterations, logits 0 on the diagonal and -8 elsewhere), so
it never equals I; with n equal streams any doubly stochastic mixing returns them up to
rounding, which is the insertion error the result's parity reports. With ``dynamic`` too, the
dynamic terms act on a_m and b only (``A_r`` stays static and doubly stochastic).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.utils.checkpoint import checkpoint

from .._fx import info
from ..config import RewireConfig
from ..fold.rewired import FoldedRewire, RewireSite
from .base import RewiredBlock, Rewiring, StreamState, folded, kept, plain_meta
from .blocks import BlockStack, PreNormForm, bind_arguments, form_of

DYNAMIC_SCALE = 0.01      # the paper's initial s_alpha, s_beta
MHC_OFF_DIAGONAL = -8.0   # mHC's initial logits off the diagonal (0 on it)
SINKHORN_STEPS = 20
MHC_KEPT = ("mHC: its Sinkhorn mixing is never exactly the identity, so the plain residual "
            "would differ from it by rounding")


def sinkhorn(logits: torch.Tensor, steps: int = SINKHORN_STEPS) -> torch.Tensor:
    """exp(logits) normalised alternately by rows and columns (columns last), in float32."""
    p = torch.exp(logits.float() - logits.float().max())
    for _ in range(steps):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


class HyperConnection(nn.Module):
    """The hyper-connection of one sublayer over n streams (see the module docstring)."""

    def __init__(self, n: int, width: int, layer: int, *, dynamic: bool, mhc: bool,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.n, self.layer, self.dynamic, self.mhc = n, layer, dynamic, mhc
        kw = dict(dtype=dtype, device=device)
        read = torch.zeros(n, 1, **kw)
        read[layer % n, 0] = 1.0
        if mhc:
            self.static_read = nn.Parameter(read)
            self.residual_logits = nn.Parameter(
                torch.full((n, n), MHC_OFF_DIAGONAL, **kw).fill_diagonal_(0.0))
        else:
            self.static_alpha = nn.Parameter(torch.cat([read, torch.eye(n, **kw)], dim=1))
        self.static_beta = nn.Parameter(torch.ones(n, **kw))
        if dynamic:
            self.dynamic_alpha = nn.Parameter(torch.zeros(width, 1 if mhc else n + 1, **kw))
            self.dynamic_beta = nn.Parameter(torch.zeros(width, 1, **kw))
            self.alpha_scale = nn.Parameter(torch.full((), DYNAMIC_SCALE, **kw))
            self.beta_scale = nn.Parameter(torch.full((), DYNAMIC_SCALE, **kw))

    @classmethod
    def initial(cls, params: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
        """The initial value of each parameter of the hyper-connection of sublayer ``layer``
        whose parameters are ``params`` (n, width, dynamic and mhc read from them)."""
        beta = params["static_beta"]
        dynamic = "dynamic_alpha" in params
        fresh = cls(beta.numel(), params["dynamic_alpha"].shape[0] if dynamic else 1, layer,
                    dynamic=dynamic, mhc="residual_logits" in params, dtype=beta.dtype,
                    device=beta.device)
        return dict(fresh.named_parameters())

    def _alpha(self, dtype) -> torch.Tensor:
        if self.mhc:
            mix = sinkhorn(self.residual_logits).to(dtype)
            return torch.cat([self.static_read.to(dtype), mix], dim=1)
        return self.static_alpha.to(dtype)

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the sublayer's input x, the carried streams sum_j A_r[j,i] h_j, the write weights b).

        Static weights are one matrix product each on the streams flattened to (n, N) (no
        permuted copies, no slices whose backward fills zeros); the carried streams and b come
        back shaped for ``write``.
        """
        alpha = self._alpha(streams.dtype)                       # (n, n+1): [a_m | A_r]
        beta = self.static_beta.to(streams.dtype)
        if not self.dynamic:
            flat = streams.reshape(self.n, -1)
            x = (alpha[:, 0] @ flat).view(streams.shape[1:])
            return x, alpha[:, 1:].t() @ flat, beta.view(self.n, 1)
        shape = (self.n,) + (1,) * (streams.dim() - 1)
        normed = F.rms_norm(streams, (streams.shape[-1],))
        dyn_a = torch.movedim(torch.tanh(normed @ self.dynamic_alpha.to(streams.dtype))
                              * self.alpha_scale, 0, -2)                     # (..., n, 1|n+1)
        read = dyn_a[..., 0] + alpha[:, 0]                                    # (..., n)
        x = torch.einsum("k...d,...k->...d", streams, read)
        if self.mhc:   # dynamic reads only; the carried mix stays doubly stochastic
            carried = torch.einsum("k...,km->m...", streams, alpha[:, 1:])
        else:
            carried = torch.einsum("k...d,...km->m...d", streams, dyn_a[..., 1:] + alpha[:, 1:])
        dyn_b = torch.tanh(normed @ self.dynamic_beta.to(streams.dtype)) * self.beta_scale
        return x, carried, dyn_b + beta.view(shape)

    def write(self, carried: torch.Tensor, beta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The new streams ``carried_i + b_i * y``, shaped (n, *y.shape)."""
        if not self.dynamic:   # (n, N) + (n, 1) @ (1, N): one product, 1*y and h + y exact
            return torch.addmm(carried, beta, y.reshape(1, -1)).view(self.n, *y.shape)
        return carried + beta * y

    def extra_repr(self) -> str:
        return f"n={self.n}, layer={self.layer}, dynamic={self.dynamic}, mhc={self.mhc}"


class HyperBlock(RewiredBlock):
    """A pre-norm block whose residual adds are hyper-connections over n streams.

    The streams after block i are the state's entry i (the next wrapper takes them out). The
    last wrapper returns the read-out of its streams, the others their first stream (the read-
    out of every block would cost n passes over the streams for a value no block reads), so
    the model's loop, its final norm and ``output_hidden_states`` see the ordinary stream at
    insertion. transformers records hidden states by forward hooks on the decoder-layer
    class: the wrapper runs the block's forward hooks itself with what it returns, since it
    does not call the block's forward.
    """

    kind = "hyper"

    def __init__(self, block: nn.Module, index: int, count: int, state: StreamState,
                 form: PreNormForm, config: RewireConfig, width: int) -> None:
        super().__init__(block, index, count, state)
        self.form = form
        self.n = config.n
        like = next(block.parameters())
        self.hcs = nn.ModuleList(
            HyperConnection(config.n, width, layer_of(index, k), dynamic=config.dynamic,
                            mhc=config.mhc, dtype=like.dtype, device=like.device)
            for k in range(len(form.pairs)))

    def forward(self, hidden, *args, **kwargs):
        seen = self._state.values
        if self.first:
            self._state.clear()
            streams = hidden.unsqueeze(0).expand(self.n, *hidden.shape)
        else:
            streams = seen.pop(self.index - 1)
        extra = self._arguments(hidden, args, kwargs)
        if getattr(self.block, "gradient_checkpointing", False) and self.training \
                and torch.is_grad_enabled():
            # as transformers' GradientCheckpointingLayer: no cache write on the replay; the
            # replay only recomputes the streams, the state is written here, once
            for name in ("cache", "past_key_values", "layer_past"):
                if extra.get(name) is not None:
                    extra[name] = None
            if "use_cache" in extra:
                extra["use_cache"] = False
            run = getattr(self.block, "_gradient_checkpointing_func", None)   # the user's
            streams = (run or partial(checkpoint, use_reentrant=False))(self._step, streams,
                                                                          extra)
        else:
            streams = self._step(streams, extra)
        if self.last:
            out = readout(streams)
            self._state.clear()
        else:   # the next wrapper reads the streams from the state, not this tensor
            out = streams[0]
            seen[self.index] = streams
        _run_forward_hooks(self.block, (hidden,), out)
        return out

    def _arguments(self, hidden, args, kwargs) -> dict:
        if not self.form.takes_arguments:
            if args or kwargs:
                raise TypeError(f"{type(self.block).__name__} takes only the stream in its "
                                "form ('timm'); rewire cannot pass other arguments on")
            return {}
        extra = bind_arguments(self.block, hidden, args, kwargs)
        for name in self.form.unsupported:
            if extra.get(name) is not None:
                raise TypeError(f"{type(self.block).__name__} got {name}; hyper-connections "
                                "do not support cross-attention inputs")
        return {k: v for k, v in extra.items() if k not in self.form.dropped}

    def _step(self, streams: torch.Tensor, extra: dict) -> torch.Tensor:
        for k, ((norm, fn), hc) in enumerate(zip(self.form.pairs, self.hcs)):
            x, carried, beta = hc.read(streams)
            sub = getattr(self.block, fn)
            x = getattr(self.block, norm)(x)
            y = sub(x, **extra) if fn == self.form.attention else sub(x)
            if self.form.returns_tuple and fn == self.form.attention:
                y = y[0]
            for name in (self.form.scales[k] if k < len(self.form.scales) else ()):
                scale = getattr(self.block, name, None)
                if scale is not None:
                    y = scale(y)
            streams = hc.write(carried, beta, y)
        return streams


def layer_of(index: int, k: int) -> int:
    """The sublayer number of block ``index``'s k-th sublayer (which stream it reads at init)."""
    return 2 * index + k


def hc_params(params: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """A wrapper's new parameters grouped by hyper-connection: {k: {name: tensor}}."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in params.items():
        head, k, rest = name.split(".", 2) if name.count(".") >= 2 else (name, "", "")
        if head == "hcs" and k.isdigit():
            groups.setdefault(int(k), {})[rest] = t
    return dict(sorted(groups.items()))


def readout(streams: torch.Tensor) -> torch.Tensor:
    """``h_1 + sum_i (h_i - h_1) / n``: the mean of the streams, exactly h for n equal ones."""
    n = streams.shape[0]
    if n == 1:
        return streams[0]
    first = streams[0]
    return first + (streams[1:] - first).sum(0) / n


def _run_forward_hooks(module: nn.Module, args: tuple, output) -> None:
    """Call the forward hooks registered on ``module``, as its own call would have."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if module._forward_hooks_with_kwargs.get(hook_id, False):
            hook(module, args, {}, output)
        else:
            hook(module, args, output)


def _ndim(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    shape = info(node).shape   # shape propagation's record, when fold was given inputs
    if shape is None:
        raise ValueError(f"fold cannot tell the rank of {node.format_node()}")
    return len(shape)


def _width(block: nn.Module, form: PreNormForm) -> int:
    norm = getattr(block, form.pairs[0][0])
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    raise ValueError(f"cannot tell the width of {type(block).__name__}'s stream from "
                     f"{form.pairs[0][0]}")


class Hyper(Rewiring):
    """Hyper-connections: pre-norm blocks only; exact at insertion unless mhc."""

    name = "hyper"
    wrapper = HyperBlock

    def check(self, stack: BlockStack, config: RewireConfig) -> None:
        for block in stack.blocks:
            form_of(block)

    def wrap(self, stack: BlockStack, config: RewireConfig, state: StreamState
             ) -> list[RewiredBlock]:
        count = len(stack.container)
        out = []
        for k, block in enumerate(stack.blocks):
            form = form_of(block)
            out.append(HyperBlock(block, k, count, state, form, config, _width(block, form)))
        return out

    def is_initial(self, params: Mapping[str, torch.Tensor], index: int) -> bool:
        for k, group in hc_params(params).items():
            init = HyperConnection.initial(group, layer_of(index, k))
            if set(init) != set(group) or not all(torch.equal(group[name].detach(), value)
                                                  for name, value in init.items()):
                return False
        return True

    def fold_graph(self, gm: fx.GraphModule, sites: list[RewireSite]) -> list[FoldedRewire]:
        # decide: the leading blocks still at init whose graph is the expected one
        plan, why = [], None
        for i, site in enumerate(sites):
            groups = hc_params(site.params)
            if any("residual_logits" in g for g in groups.values()):
                why = MHC_KEPT
                break
            if site.index != i:
                why = f"{sites[0].path} is not the first rewired block of the graph"
                break
            if not self.is_initial(site.params, site.index):
                why = "its hyper-connections moved from their initial values"
                break
            xs, ys = site.into_inner(), site.from_inner()
            outs = site.to_outside()
            last = i == len(sites) - 1
            nxt = None if last else sites[i + 1]
            if len(xs) != len(groups) or len(ys) != len(groups) or \
                    (last and len(outs) != 1) or \
                    (nxt is not None and not all(nxt.is_own(u) for o in outs
                                                 for u in site.readers(o))):
                why = ("its graph is not the one a hyper-connections block exports to (each "
                       "sublayer's input and output, streams read by the next block only)")
                break
            plan.append((site, xs, ys, outs))
        records = []
        if plan:
            first = sites[0].from_outside()
            boundary = sites[len(plan)] if len(plan) < len(sites) else None
            entering = boundary.from_outside() if boundary is not None else []
            if len(first) != 1 or (boundary is not None and len(entering) != 1):
                plan, why = [], ("the stream entering the first block, or the streams "
                                 "entering the first kept block, is not one value")
        if plan:
            records = self._fold_prefix(gm, plan, first[0], boundary, entering)
        for j, site in enumerate(sites[len(plan):]):
            if any("residual_logits" in g for g in hc_params(site.params).values()):
                reason = MHC_KEPT
            elif not self.is_initial(site.params, site.index):
                reason = "its hyper-connections moved from their initial values"
            elif j == 0:
                reason = why
            else:
                reason = (f"still at init, but {sites[len(plan)].path} before it is kept, so "
                          "its n streams differ and the plain residual would compute something "
                          "else")
            records.append(kept(site, reason))
        return records

    def _fold_prefix(self, gm: fx.GraphModule, plan: list, h: fx.Node,
                     boundary: RewireSite | None, entering: list[fx.Node]
                     ) -> list[FoldedRewire]:
        """Rewrite the blocks of ``plan`` into ``h + y`` per sublayer (the order the block
        added in), then hand the stream on: n copies of it to ``boundary``, or itself to the
        model's read-out's readers."""
        for site, xs, ys, _ in plan:
            for x, y in zip(xs, ys):
                x.replace_all_uses_with(h, delete_user_cb=site.is_inner)
                with gm.graph.inserting_after(y):
                    total = gm.graph.call_function(torch.ops.aten.add.Tensor, (h, y))
                total.meta = plain_meta(site, y)
                h = total
        if boundary is not None:
            n = hc_params(boundary.params)[0]["static_beta"].numel()
            ndim = _ndim(h)
            with gm.graph.inserting_before(boundary.own[0]):
                one = gm.graph.call_function(torch.ops.aten.unsqueeze.default, (h, 0))
                streams = gm.graph.call_function(torch.ops.aten.expand.default,
                                                 (one, [n] + [-1] * ndim))
            for node in (one, streams):
                node.meta = {k: v for k, v in boundary.own[0].meta.items()
                             if k == "nn_module_stack"}
            entering[0].replace_all_uses_with(streams, delete_user_cb=boundary.is_own)
        else:
            plan[-1][3][0].replace_all_uses_with(h)
        return [folded(site, gm) for site, *_ in reversed(plan)][::-1]

    def describe(self, config: RewireConfig) -> str:
        extra = ", dynamic" if config.dynamic else ""
        extra += ", mHC" if config.mhc else ""
        return f"hyper (n {config.n}{extra})"

