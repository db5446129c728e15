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

mHC (``mhc=True``, DeepSeek 2026): ``A_r`` is the Sinkhorn projection of ``exp(logits)`` onto
the doubly stochastic matrices (20 iterations, logits 0 on the diagonal and -8 elsewhere), so
it never equals I; with n equal streams any doubly stochastic mixing returns them up to
rounding, which is the insertion error the result's parity reports. With ``dynamic`` too, the
dynamic terms act on a_m and b only (``A_r`` stays static and doubly stochastic).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import RewireConfig
from .base import RewiredBlock, Rewiring, StreamState
from .blocks import BlockStack, PreNormForm, bind_arguments, form_of

DYNAMIC_SCALE = 0.01      # the paper's initial s_alpha, s_beta
MHC_OFF_DIAGONAL = -8.0   # mHC's initial logits off the diagonal (0 on it)
SINKHORN_STEPS = 20


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

    def initial(self) -> dict[str, torch.Tensor]:
        """Each parameter's initial value (what ``at_init`` compares with)."""
        fresh = HyperConnection(self.n, self._width(), self.layer, dynamic=self.dynamic,
                                mhc=self.mhc, dtype=self.static_beta.dtype,
                                device=self.static_beta.device)
        return dict(fresh.named_parameters())

    def _width(self) -> int:
        return self.dynamic_alpha.shape[0] if self.dynamic else 1

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
            HyperConnection(config.n, width, 2 * index + k, dynamic=config.dynamic,
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

    def at_init(self, wrapper: RewiredBlock) -> bool:
        for hc in wrapper.hcs:
            init = hc.initial()
            if not all(torch.equal(p.detach(), init[name]) for name, p in hc.named_parameters()):
                return False
        return True

    def describe(self, config: RewireConfig) -> str:
        extra = ", dynamic" if config.dynamic else ""
        extra += ", mHC" if config.mhc else ""
        return f"hyper (n {config.n}{extra})"

