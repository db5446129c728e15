"""Rewire: a richer residual stream for a model that already has one, exact at insertion.

    from ressurgeon import rewire, RewireConfig, load_adapter
    result = rewire(model, (ids,), RewireConfig(kind="dwa"))
    result.module            # same class as model (a transformers model stays one)
    result.parity            # max abs diff 0 against the original
    result.save_adapter("adapter/")
    again = load_adapter(fresh_base_model, "adapter/")

Kinds (one file each, registered in ``base.KINDS``): ``dwa`` (DenseFormer's depth-weighted
average, ``dwa.py``) and ``hyper`` (hyper-connections and mHC, ``hyper.py``). The blocks are
the items of the model's block list (``blocks.py``, found as ``deepen`` finds a layer stack);
each is replaced by a wrapper holding the original block and the new parameters, and what
crosses the model's own layer loop travels in a per-forward state (``base.StreamState``).
Plain models with a block list work the same way as transformers models; the model's forward
must call the blocks in order, each once per forward.

Behaviour of a rewired transformers model:
- ``generate()`` and the KV cache: the attention layers and their ``layer_idx`` are untouched,
  and DWA and hyper-connections mix across depth at the same position only, so cached keys
  and values stay valid; each forward (prompt or new token) starts a fresh state.
- ``output_hidden_states``: entry i+1 is block i's output as the model's recorder sees it: for
  dwa the block's own output Y_i (before the average), for hyper the read-out of the streams.
  At insertion both equal the original's.
- gradient checkpointing: dwa leaves it to the block (transformers checkpoints the inner
  layer); hyper checkpoints its own step, whose replay recomputes the streams only. The state
  is keyed by block index and written outside the replay, so it never grows twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from .._torch import normalize_inputs
from ..config import RewireConfig
from ..errors import ConfigError, VerificationError
from ..catalog import register_rewiring
from ..load.record import record_of
from ..verify import ParityReport, compare_outputs, eval_outputs
from .adapter import CONFIG_FILE, WEIGHTS_FILE, load_into, read_adapter, write_adapter

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an adapter folder holds
from .base import KINDS, RewiredBlock, Rewiring, StreamState
from .blocks import FORMS, BlockStack, PreNormForm, describe_blocks, find_blocks, form_of

__all__ = ["rewire", "RewireResult", "RewireConfig", "load_adapter", "unwrap", "find_blocks",
           "KINDS", "Rewiring", "RewiredBlock", "register_rewiring", "FORMS", "PreNormForm",
           "MHC_BOUND", "describe_blocks", "ADAPTER_FILES"]

# mHC's insertion error bound (relative to the output's scale, float32 and bfloat16 alike: a
# few roundings of the Sinkhorn column sums per sublayer); tests check it on the tiny models.
MHC_BOUND = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2,
             torch.float64: 1e-12}


@dataclass
class RewireResult:
    """What ``rewire`` did.

    ``module`` is the rewired model (the same class as the input); ``blocks`` the names of the
    rewired blocks; ``parity`` the measured output difference against the original (None when
    verify=False); ``exact`` whether the kind is exact at insertion (False for mHC);
    ``description`` the kind and its settings in words.
    """

    module: nn.Module
    config: RewireConfig
    blocks: list[str]
    prefix: str
    parity: ParityReport | None
    exact: bool
    description: str

    @property
    def wrappers(self) -> list[RewiredBlock]:
        return [m for m in self.module.get_submodule(self.prefix) if isinstance(m, RewiredBlock)]

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """The added parameters, by their names in ``module`` (what an adapter holds)."""
        return {f"{self.prefix}.{w.index}.{n}": p for w in self.wrappers
                for n, p in w.new_parameters()}

    @property
    def params_added(self) -> int:
        return sum(p.numel() for p in self.new_parameters().values())

    def still_at_init(self) -> list[str]:
        """The rewired blocks whose new parameters still hold their initial values."""
        kind = KINDS[self.config.kind]
        return [f"{self.prefix}.{w.index}" for w in self.wrappers if kind.at_init(w)]

    def unwrap(self) -> nn.Module:
        """A copy of ``module`` with its original blocks back, when every new parameter is still
        at its initial value (so the plain residual computes the same, exactly unless mHC).

        Raises:
            ConfigError: some block's new parameters moved (training changed the wiring).
        """
        return unwrap(self.module)

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the new parameters and the config to ``folder`` (see ``adapter.py``)."""
        params = self.new_parameters()
        meta = {"config": self.config.to_dict(), "blocks": self.prefix,
                "count": len(self.blocks), "base": type(self.module).__name__,
                "parameters": {k: list(v.shape) for k, v in params.items()}}
        return write_adapter(folder, meta, params)

    def block_records(self) -> list[dict]:
        """Per rewired block: its name, the original block's class, the parameters added, and
        what the kind reads (dwa: the outputs averaged; hyper: the pre-norm form)."""
        rows = []
        for w in self.wrappers:
            row = {"name": f"{self.prefix}.{w.index}", "class": type(w.block).__name__,
                   "params": sum(p.numel() for _, p in w.new_parameters())}
            if w.kind == "dwa":
                row["averages"] = w.sources
            else:
                row["form"] = w.form.name
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"kind": self.config.kind, "description": self.description,
                "config": self.config.to_dict(), "blocks": self.blocks,
                "per_block": self.block_records(),
                "block_list": self.prefix, "params_added": self.params_added,
                "exact": self.exact, "parity": self.parity.to_dict() if self.parity else None}


def rewire(model: nn.Module, example_inputs: tuple | None = None,
           config: RewireConfig | None = None, *, verify: bool = True) -> RewireResult:
    """Rewire the residual stream of ``model``'s blocks, exactly preserving what it computes.

    Args:
        model: a transformers PreTrainedModel (Llama, Mistral, Qwen2, GPT-2, ...) or any
            nn.Module whose forward runs a block list (ModuleList / Sequential) in order. Not
            modified unless ``config.inplace``.
        example_inputs: tuple of tensors for the parity check (token ids for a language
            model); may be None with ``verify=False``.
        config: RewireConfig (kind, and its options); default ``RewireConfig()`` (dwa).
        verify: run both models (eval mode) and compare their outputs: exact kinds must give
            the same outputs, mHC must stay within ``MHC_BOUND``.

    Returns:
        RewireResult: ``.module``, ``.blocks``, ``.parity``, ``.params_added``,
        ``.save_adapter(folder)``, ``.unwrap()``.

    Raises:
        ConfigError: no block list; hyper-connections on a block that is not pre-norm (the
            message says why); verify without example inputs.
        VerificationError: the outputs differ beyond tolerance (a ressurgeon bug for exact
            kinds).

    Example:
        >>> result = rewire(llama, (ids,), RewireConfig(kind="hyper", n=4))   # doctest: +SKIP
        >>> result.parity.max_abs_diff                                         # doctest: +SKIP
        0.0
    """
    config = config or RewireConfig()
    kind = KINDS[config.kind]
    if verify and example_inputs is None:
        raise ConfigError("rewire verifies the rewired model on example inputs; pass them (a "
                          "tuple of tensors) or verify=False")
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else ()
    stack = find_blocks(model)
    if any(isinstance(b, RewiredBlock) for b in stack.blocks):
        raise ConfigError(f"{stack.prefix} is rewired already; unwrap it first "
                          "(RewireResult.unwrap) or rewire the original model")
    kind.check(stack, config)
    kwargs = record_of(model).forward_kwargs   # transformers: use_cache=False, both models
    before = eval_outputs(model, inputs, kwargs) if verify and config.inplace else None
    target = model if config.inplace else copy.deepcopy(model)
    names = stack.names
    _install(target, stack, kind, config)
    exact = not (config.kind == "hyper" and config.mhc)
    result = RewireResult(module=target, config=config, blocks=names, prefix=stack.prefix,
                          parity=None, exact=exact, description=kind.describe(config))
    if verify:
        result.parity = _verify(model, target, inputs, before, exact)
    return result


def _install(model: nn.Module, stack: BlockStack, kind: Rewiring, config: RewireConfig) -> None:
    """Replace the items of ``model``'s block list (found at ``stack.prefix``, as in the model
    it was copied from) by the kind's wrappers."""
    container = model.get_submodule(stack.prefix)
    target = BlockStack(prefix=stack.prefix, container=container, hf=stack.hf)
    for i, wrapper in enumerate(kind.wrap(target, config, StreamState())):
        container[i] = wrapper


def _verify(original: nn.Module, rewired: nn.Module, inputs: tuple,
            before: list | None, exact: bool) -> ParityReport:
    kwargs = record_of(original).forward_kwargs   # transformers: use_cache=False, both models
    want = before if before is not None else eval_outputs(original, inputs, kwargs)
    parity = compare_outputs(want, eval_outputs(rewired, inputs, kwargs), check="rewrite")
    if exact:
        if parity.max_abs_diff != 0.0 or parity.nonfinite:
            raise VerificationError(f"the rewired model's outputs differ from the original's "
                                    f"({parity.describe()}); they should be identical at "
                                    "insertion: this is a ressurgeon bug, please report it")
        return parity
    # mHC: within MHC_BOUND of the output's scale, and no new non-finite value
    scale = max((float(t.detach().abs().max()) for t in want if t.numel()
                 and t.is_floating_point()), default=0.0)
    dtype = next((t.dtype for t in want if t.is_floating_point()), torch.float32)
    bound = MHC_BOUND.get(dtype, MHC_BOUND[torch.float32]) * max(1.0, scale)
    parity = replace(parity, tolerance=bound)
    if not parity.ok:
        raise VerificationError(f"mHC's insertion error exceeds its bound ({parity.describe()})")
    return parity


def unwrap(model: nn.Module) -> nn.Module:
    """A copy of a rewired ``model`` with its original blocks back (the plain residual).

    Only when every wrapper's new parameters are still at their initial values: then the
    plain model computes what the rewired one does (exactly, unless mHC).

    Raises:
        ConfigError: the model is not rewired, or some new parameters moved.
    """
    stack = find_blocks(model)
    wrappers = [b for b in stack.blocks if isinstance(b, RewiredBlock)]
    if not wrappers:
        raise ConfigError(f"{stack.prefix} holds no rewired blocks")
    kind = KINDS[wrappers[0].kind]
    moved = [f"{stack.prefix}.{w.index}" for w in wrappers if not kind.at_init(w)]
    if moved:
        raise ConfigError(f"the new parameters of {', '.join(moved[:4])}"
                          f"{', ...' if len(moved) > 4 else ''} have moved from their initial "
                          "values, so the plain residual would compute something else; keep "
                          "the rewired model")
    plain = copy.deepcopy(model)
    container = find_blocks(plain).container
    for i, wrapper in enumerate(list(container)):
        container[i] = wrapper.block
    return plain


def load_adapter(base_model: nn.Module, folder: str | Path, *, inplace: bool = False
                 ) -> nn.Module:
    """``base_model`` rewired as the adapter in ``folder`` says, with its saved parameters.

    Args:
        base_model: the model the adapter was made from (same architecture and weights).
        folder: written by ``RewireResult.save_adapter`` or ``ressurgeon rewire``.
        inplace: rewire ``base_model`` itself instead of a copy.

    Returns:
        The rewired model (a transformers model stays its own class).

    Raises:
        LoadError: not an adapter folder, a newer format version, damaged files.
        ConfigError: the adapter does not fit this model (another block list, other shapes).

    Example:
        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(path), "adapter/")  # doctest: +SKIP
    """
    meta, tensors = read_adapter(folder)
    config = RewireConfig.from_dict({**meta["config"], "inplace": inplace})
    stack = find_blocks(base_model)
    if stack.prefix != meta["blocks"] or len(stack.container) != meta["count"]:
        raise ConfigError(f"the adapter in {folder} rewires {meta['blocks']} "
                          f"({meta['count']} blocks); this model's block list is "
                          f"{stack.prefix} ({len(stack.container)} blocks)")
    result = rewire(base_model, None, config, verify=False)
    load_into(result.module, meta, tensors, Path(folder))
    return result.module
