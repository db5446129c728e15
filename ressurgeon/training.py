"""Recipes that make shortcuts (and new blocks) pay off when a trained network is fine-tuned.

Surgery builds modules; fine-tuning them well is a training procedure, and
those live here:

- ``param_groups``: optimizer groups in which what surgery added sits apart
  from the original weights; gates are never weight-decayed (decay pulls a
  gate back to its closed value) and get their own learning rate.
- ``ShortcutRamp``: opens ``init="morph"`` shortcuts over the first steps of
  fine-tuning, from exactly the trained function (c = 0) to rezero blocks (c = 1).
- ``freeze_except``: train only some modules (LLaMA Pro trains only new blocks).

The gate learning rates come from ``examples/retrofit_study.py`` (README,
"Surgery on a trained network"): ``preserve`` gates did no better at x30 than
at x1 (an earlier prototype sweep up to x100 agreed); morph's gate at x0.3 was
as good as x1 or better on the MLPs, worse on the CNN, where morph is not
recommended at all.

Example:
    >>> result = add_skips(trained, (x,), SkipConfig(init="morph"))          # doctest: +SKIP
    >>> opt = torch.optim.AdamW(param_groups(result.module, lr=1e-3))          # doctest: +SKIP
    >>> ramp = ShortcutRamp(result.module, steps=len(loader))                  # doctest: +SKIP
    >>> for x, y in loader:                                                     # doctest: +SKIP
    ...     ramp.step(); loss = F.cross_entropy(result.module(x), y); ...
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from .config import Init
from .errors import ConfigError
from .shortcuts import Shortcut, is_shortcut

# Gate learning rate, as a multiple of the weights'; each join says its own (JoinModule.gate_lr_scale).
GATE_LR_SCALE = {Init(k): v for k, v in Shortcut.gate_lr_scales.items()}


def added_parameters(module: nn.Module, extra: Iterable[str] = ()) -> dict[str, str]:
    """{parameter name: "gate" | "added"} for what surgery added to ``module``.

    Gates are the shortcuts' ``gate`` parameters; "added" are every other
    parameter of a shortcut module (projections, highway and concat weights)
    and of the modules named in ``extra`` (e.g. the blocks ``deepen`` inserted).
    """
    roles: dict[str, str] = {}
    extra = tuple(extra)
    for prefix, sub in module.named_modules():
        if is_shortcut(sub):  # the join says which of its parameters are gates
            own = sub.parameter_roles()
        elif prefix and any(prefix == e or prefix.startswith(e + ".") for e in extra):
            own = {name: "added" for name, _ in sub.named_parameters()}
        else:
            continue
        for name, role in own.items():
            roles[f"{prefix}.{name}" if prefix else name] = role
    return roles


def param_groups(module: nn.Module, lr: float, *, gate_lr: float | None = None,
                 weight_decay: float = 0.0, added_lr: float | None = None,
                 extra: Iterable[str] = ()) -> list[dict]:
    """Optimizer parameter groups: original weights, what surgery added, and gates.

    Args:
        module: a rewritten model (from ``add_skips``, ``deepen``, or ``load_model`` of
            their outputs: shortcuts are ``Shortcut`` modules there).
        lr: learning rate of the original weights.
        gate_lr: learning rate of the gates; default ``lr`` times ``GATE_LR_SCALE`` of
            each shortcut's init (one group per init).
        weight_decay: for the original and added weights; gates get none.
        added_lr: learning rate of added weights (projections, new blocks); default ``lr``.
        extra: module names whose parameters count as added (e.g. ``deepen``'s new blocks).

    Returns:
        A list of groups for any ``torch.optim`` optimizer; each has a ``name``
        ("weights", "added", "gates:<init>") and only trainable parameters; empty
        groups are left out.

    Raises:
        ConfigError: a learning rate or weight decay is negative.

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.01))  # doctest: +SKIP
    """
    for name, value in (("lr", lr), ("gate_lr", gate_lr), ("added_lr", added_lr),
                        ("weight_decay", weight_decay)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
    roles = added_parameters(module, extra)
    owners = {f"{p}.{name}" if p else name: sub for p, sub in module.named_modules()
              if is_shortcut(sub) for name, role in sub.parameter_roles().items()
              if role == "gate"}
    groups: dict[str, dict] = {}

    def group(key: str, **settings) -> dict:
        return groups.setdefault(key, {"name": key, "params": [], **settings})

    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(name, "weights")
        if role == "gate":
            owner = owners[name]
            rate = gate_lr if gate_lr is not None else lr * owner.gate_lr_scale()
            init = owner.init.value if owner.init is not None else "unknown"
            group(f"gates:{init}", lr=rate, weight_decay=0.0)["params"].append(param)
        elif role == "added":
            group("added", lr=added_lr if added_lr is not None else lr,
                  weight_decay=weight_decay)["params"].append(param)
        else:
            group("weights", lr=lr, weight_decay=weight_decay)["params"].append(param)
    return [g for g in groups.values() if g["params"]]


class ShortcutRamp:
    """Opens ``init="morph"`` shortcuts: ``c`` goes from 0 to 1 over ``steps`` calls of ``step()``.

    At c = 0 the model computes exactly what the trained one did; at c = 1 each
    block is ``S(x) + a*h``, a rezero block whose gate ``a`` was trained along
    the way. Call ``step()`` once before each optimizer step. ``c`` is a buffer,
    so it is saved with the model and ``fold`` reads it.

    Args:
        module: a model with morph shortcuts.
        steps: optimizer steps until c = 1 (the study used one epoch; 0.25-1 epoch did
            as well).

    Raises:
        ConfigError: ``steps`` < 1, or the model has no morph shortcut.
    """

    def __init__(self, module: nn.Module, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
        self.shortcuts = [m for m in module.modules()
                          if is_shortcut(m) and m.init is Init.MORPH]
        if not self.shortcuts:
            raise ConfigError("the model has no morph shortcut; add them with "
                              "SkipConfig(init='morph') (or --init morph)")
        self.steps = steps
        self.done = 0

    @property
    def value(self) -> float:
        return min(1.0, self.done / self.steps)

    def step(self) -> float:
        """Advance one step; return the new c."""
        self.done += 1
        for m in self.shortcuts:
            m.ramp.fill_(self.value)
        return self.value


def freeze_except(module: nn.Module, names: Iterable[str]) -> int:
    """Make only the parameters under the named modules trainable; return how many are.

    LLaMA Pro's recipe: after ``deepen``, train only the new blocks.

    Raises:
        ConfigError: a name matches no module.
    """
    names = tuple(names)
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"no module named {missing[0]!r} in the model")
    trainable = 0
    for name, param in module.named_parameters():
        param.requires_grad_(any(name.startswith(n + ".") for n in names))
        trainable += param.requires_grad
    return trainable
