"""Deepen: a trained model -> a deeper one whose new blocks start as exactly the identity.

    from ressurgeon import deepen, DeepenConfig
    result = deepen(model, (x,), DeepenConfig(blocks=2))
    result.module       # computes exactly what model did (max abs diff 0)
    result.new_blocks   # their module names: freeze_except(result.module, result.new_blocks)

The pipeline is add_skips's: trace -> analyse once -> find positions (``positions.py``) ->
plan (``plan.py``) -> insert (``insert.py``) -> verify. Two kinds of new block:

- ``copy`` (block expansion, Wu et al. 2024 "LLaMA Pro"; progressive stacking): a copy of a
  residual block goes right after it, with the parameters that end each residual branch set
  to zero (``analysis.zeros``), so the copy computes ``x + 0``;
- ``new`` (Net2DeeperNet's aim, by a residual block): ``x + out(act(layer(x)))`` after a layer
  of a plain network, ``layer`` shaped like that layer, ``out`` zero.

A Hugging Face ``transformers`` model is deepened in its own layer list (``hf.py``), and a
safetensors checkpoint folder on disk, tensor by tensor (``expand_checkpoint``, ``stream.py``).
New blocks are ordinary layers and one residual add: ``fold`` removes those whose zeroed
parameters are still exactly zero, ``DeepenResult.unfold`` does the same and keeps the model
trainable (and works for the layer list of a transformers model too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch import fx

from .._fx import attr, capture_info
from .._torch import normalize_inputs, quiet_copy
from ..analysis.layers import analyze_graph
from ..errors import ConfigError, VerificationError
from ..capture.exported import as_module
from ..capture.submodule import splice, submodule_inputs
from ..load.hf import is_pretrained
from ..capture.trace import trace_model
from ..verify import ParityReport, check_parity
from . import hf
from ..config import DeepenConfig, How, TraceOptions
from .insert import NewBlock, ResidualLayer, insert_blocks
from .plan import DeepenPlan, PlannedBlock, check_plan, plan_deepen
from .positions import Position, Reason, choose, find_positions
from .stream import (DEFAULT_MAX_SHARD_BYTES, ZERO_RULES, ExpansionReport, StackPlan,
                     expand_checkpoint)

__all__ = ["deepen", "DeepenResult", "DeepenConfig", "DeepenPlan", "PlannedBlock", "How",
           "NewBlock", "Position", "Reason", "ResidualLayer", "DEFAULT_MAX_SHARD_BYTES",
           "ZERO_RULES", "ExpansionReport", "expand_checkpoint"]


@dataclass
class DeepenResult:
    """What ``deepen`` did.

    ``module`` is the deeper model: a GraphModule, or for a transformers model its own class;
    ``blocks`` one record per new block (``new_blocks`` their names); ``positions`` every
    candidate position, chosen or rejected with a reason; ``plan`` the plan applied; ``parity``
    the measured output difference against the original (None when verify=False); ``how``
    "copy" or "new"; ``method`` how the model was captured ("fx", "export", "graph", or
    "transformers"); ``config_keys`` the config entries a transformers model's deepening changed.
    """

    module: nn.Module
    blocks: list[NewBlock]
    positions: list[Position]
    plan: DeepenPlan
    parity: ParityReport | None
    how: How
    method: str
    config_keys: tuple[str, ...] = ()
    _stack: tuple[StackPlan, dict] | None = field(default=None, repr=False)
    _inside: tuple[str, "DeepenResult"] | None = field(default=None, repr=False)

    @property
    def new_blocks(self) -> list[str]:
        """Module names of the new blocks: ``freeze_except(result.module, result.new_blocks)``."""
        return [b.name for b in self.blocks]

    @property
    def params_added(self) -> int:
        return sum(b.params for b in self.blocks)

    def still_identity(self) -> list[str]:
        """The new blocks whose zeroed tensors are all still exactly zero (as inserted)."""
        return [b.name for b in self.blocks
                if all(not attr(self.module, t).any() for t in b.zeroed)]

    def unfold(self) -> nn.Module:
        """A copy of ``module`` without the new blocks that are still exactly the identity.

        Unlike ``fold`` it keeps everything else as it is (BatchNorm, trainability), and it
        works for a transformers model's layer list too (config and ``layer_idx`` follow).
        Apply it to the result whose ``module`` you trained.

        Example:
            >>> result = deepen(model, (x,), DeepenConfig(blocks=2))   # doctest: +SKIP
            >>> # train result.module here; some new blocks may stay the identity
            >>> smaller = result.unfold()                               # doctest: +SKIP
        """
        if self._inside is not None:  # DeepenConfig.module: unfold the submodule, splice it again
            path, inner = self._inside
            return splice(self.module, path, inner.unfold())
        idle = set(self.still_identity())
        if self._stack is not None:
            plan, settings = self._stack
            drop = {int(name.rpartition(".")[2]) for name in idle}
            return hf.remove_layers(self.module, plan, settings, drop)
        gm = quiet_copy(self.module)
        nodes = {n.name: n for n in gm.graph.nodes}
        for block in self.blocks:
            if block.name in idle:
                nodes[block.output].replace_all_uses_with(nodes[block.input])
        gm.graph.eliminate_dead_code()
        for name in idle:
            gm.delete_submodule(name)
        gm.graph.lint()
        gm.recompile()
        return gm

    def to_dict(self) -> dict:
        return {"method": self.method, "how": self.how.value, "config": self.plan.config.to_dict(),
                "blocks": [b.to_dict() for b in self.blocks], "new_blocks": self.new_blocks,
                "params_added": self.params_added,
                "parity": self.parity.to_dict() if self.parity else None,
                "config_keys": list(self.config_keys),
                "rejected": [p.to_dict() for p in self.positions if not p.chosen]}


def deepen(model: nn.Module, example_inputs: tuple, config: DeepenConfig | None = None, *,
           plan: DeepenPlan | None = None, verify: bool = True,
           trace: TraceOptions | None = None) -> DeepenResult:
    """Grow ``model`` with new residual blocks that start as exactly the identity.

    The deeper model computes exactly what ``model`` did (zero parameters contribute exactly
    0; a layer with zeroed tensors reads inf/NaN as 0, since 0 * inf is NaN in IEEE
    arithmetic), and the zeroed parameters receive a gradient on the first step.

    Args:
        model: the network: any nn.Module, an ExportedProgram or its ``.module()``, a
            GraphModule from ``add_skips`` (its shortcut spans are blocks to copy), or a
            transformers PreTrainedModel (deepened in its own layer list). Not modified.
        example_inputs: tuple of tensors, as for torch.export (token ids for a language model).
        config: DeepenConfig (how many blocks, copy or new, where); required unless ``plan``.
        plan: apply this plan (``result.plan``, maybe edited) instead of choosing; its config
            wins over ``config``.
        verify: run both models (eval mode) and require the same outputs.
        trace: how to capture the model (TraceOptions), as for ``add_skips``.

    Returns:
        DeepenResult: ``.module``, ``.blocks`` / ``.new_blocks``, ``.positions``, ``.parity``.

    Raises:
        ConfigError: no position qualifies (the message says why), more blocks than positions,
            a transformers model asked for new layers, or its layers cannot be expanded.
        PlanError: the plan does not fit this model.
        TraceError, ShapeError: the model cannot be captured or rejects the inputs.
        VerificationError: the deeper model's outputs differ (a ressurgeon bug).

    Example:
        >>> result = deepen(vit, (x,), DeepenConfig(blocks=2))          # doctest: +SKIP
        >>> result.new_blocks                                            # doctest: +SKIP
        ['deepen_blocks_1', 'deepen_blocks_3']
        >>> freeze_except(result.module, result.new_blocks)              # doctest: +SKIP
    """
    inputs = normalize_inputs(example_inputs)
    if plan is not None:
        config = plan.config
    if config is None:
        raise ConfigError("deepen needs a DeepenConfig (e.g. DeepenConfig(blocks=2)) or a plan")
    model = as_module(model)
    if config.module is not None:
        return _deepen_in(config.module, model, inputs, config, plan, verify, trace)
    shapes = tuple(tuple(t.shape) for t in inputs)
    if is_pretrained(model):
        positions = hf.stack_positions(model, config)
        how, method, gm, analysis = How.COPY, "transformers", None, None
    else:
        gm = trace_model(model, inputs, trace)
        analysis = analyze_graph(gm)
        how, positions = find_positions(analysis, config.how)
        method = capture_info(gm).method
    if plan is None:
        positions = choose(positions, config)
        plan = plan_deepen(positions, config, shapes)
        chosen = [p for p in positions if p.chosen]
    else:
        chosen, positions = check_plan(positions, plan)
    if gm is None:
        module, blocks, stack = hf.expand_model(model, [p.name for p in chosen], config)
        result = DeepenResult(module=module, blocks=blocks, positions=positions, plan=plan,
                              parity=None, how=how, method=method,
                              config_keys=stack.config_keys,
                              _stack=(stack, model.config.to_dict()))
    else:
        blocks = insert_blocks(gm, analysis, chosen)
        result = DeepenResult(module=gm, blocks=blocks, positions=positions, plan=plan,
                              parity=None, how=how, method=method)
    if verify:
        concrete = trace.concrete_args if trace is not None else None
        result.parity = check_parity(model, result.module, inputs, original_kwargs=concrete)
        if not result.parity.ok:
            raise VerificationError(f"the deeper model's outputs differ from the original's "
                                    f"({result.parity.describe()}); its new blocks should be "
                                    "exactly the identity: this is a ressurgeon bug, please "
                                    "report it")
    return result


def _deepen_in(path: str, model: nn.Module, inputs: tuple, config: DeepenConfig,
               plan: DeepenPlan | None, verify: bool, trace: TraceOptions | None) -> DeepenResult:
    """``deepen`` on the submodule at ``path``, spliced back into a copy of ``model``."""
    sub, sub_inputs = submodule_inputs(model, path, inputs)
    inner = deepen(sub, sub_inputs, replace(config, module=None),
                   plan=replace(plan, config=replace(plan.config, module=None))
                   if plan is not None else None, verify=verify, trace=trace)
    whole = splice(model, path, inner.module)
    blocks = [replace(b, name=f"{path}.{b.name}", zeroed=tuple(f"{path}.{t}" for t in b.zeroed))
              for b in inner.blocks]
    result = DeepenResult(module=whole, blocks=blocks, positions=inner.positions,
                          plan=replace(inner.plan, config=replace(inner.plan.config, module=path),
                                       input_shapes=tuple(tuple(t.shape) for t in inputs)),
                          parity=None, how=inner.how, method=inner.method,
                          config_keys=inner.config_keys, _inside=(path, inner))
    if verify:
        result.parity = check_parity(model, whole, inputs)
        if not result.parity.ok:
            raise VerificationError(f"the deeper model's outputs differ from the original's "
                                    f"({result.parity.describe()}) after splicing '{path}' "
                                    "back: this is a ressurgeon bug, please report it")
    return result
