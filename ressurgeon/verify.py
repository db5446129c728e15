"""Stage 5, verify: does the rewritten model compute what it should, and do gradients flow?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import ShapeError

# Parity tolerances by dtype, with the reason. preserve mode adds gate * S(x)
# with gate = 0, which is exact in IEEE arithmetic, so fp32 gets the bound the
# contract states; half precisions round differently when fx reorders nothing
# but kernels pick other algorithms for other shapes.
PARITY_ATOL = {
    torch.float64: 1e-12,   # exact math, double rounding only
    torch.float32: 1e-6,    # the DESIGN contract for preserve mode
    torch.bfloat16: 1e-2,   # 8-bit mantissa
    torch.float16: 1e-3,    # 11-bit mantissa
}


@dataclass(frozen=True)
class ParityReport:
    """How far the rewritten model's outputs are from the original's (eval mode)."""

    max_abs_diff: float
    tolerance: float
    outputs: int                 # tensors compared

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "outputs": self.outputs, "ok": self.ok}


def check_parity(original: nn.Module, rewritten: nn.Module, example_inputs: tuple, *,
                 atol: float | None = None,
                 original_kwargs: dict | None = None) -> ParityReport:
    """Run both models in eval mode on the same inputs and compare every output tensor.

    Args:
        original, rewritten: the models to compare; their train/eval modes are restored.
        example_inputs: tuple of tensors.
        atol: tolerance; by default ``PARITY_ATOL`` for the outputs' dtype.
        original_kwargs: keyword arguments for the original only: the
            ``concrete_args`` the rewritten graph was traced with.

    Returns:
        A ParityReport (``.ok`` says whether the difference is within tolerance).

    Raises:
        ShapeError: the two models return different structures or shapes.

    Example:
        >>> check_parity(model, result.module, (x,)).max_abs_diff   # doctest: +SKIP
        0.0
    """
    a = eval_outputs(original, example_inputs, original_kwargs or {})
    b = eval_outputs(rewritten, example_inputs, {})
    if len(a) != len(b):
        raise ShapeError(f"the rewritten model returns {len(b)} tensors, the original {len(a)}")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ShapeError(f"output shape changed from {tuple(x.shape)} to {tuple(y.shape)}")
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    if atol is None:
        atol = max((PARITY_ATOL.get(t.dtype, 1e-6) for t in a), default=1e-6)
    return ParityReport(max_abs_diff=worst, tolerance=atol, outputs=len(a))


def eval_outputs(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
    """The model's output tensors in eval mode, on copies of the inputs, its mode restored.

    Copies, because a forward that edits its input in place (``x.sub_(mean)``)
    would otherwise change what the next model sees, and the caller's tensors.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs),
                        **(kwargs or {}))
    finally:
        model.train(was_training)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class GradientReport:
    """Gradient norm that one backward pass gives each named parameter (None: not reached)."""

    norms: dict[str, float | None]

    @property
    def unreached(self) -> list[str]:
        return [name for name, n in self.norms.items() if n is None]


def check_gradients(module: nn.Module, example_inputs: tuple,
                    names: list[str] | None = None) -> GradientReport:
    """One forward/backward on ``sum(output**2)``; report each parameter's gradient norm.

    Args:
        module: the (rewritten) model; left in its mode, its .grad fields cleared after.
        example_inputs: tuple of tensors.
        names: parameter names (prefixes allowed) to report; all when None.

    Returns:
        GradientReport; a parameter outside the autograd graph has norm None.
    """
    params = {n: p for n, p in module.named_parameters()
              if names is None or any(n == k or n.startswith(k + ".") for k in names)}
    for p in params.values():
        p.grad = None
    out = module(*example_inputs)
    loss = sum((t.float() ** 2).mean() for t in pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.is_floating_point())
    loss.backward()
    norms = {n: (None if p.grad is None else p.grad.norm().item()) for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return GradientReport(norms=norms)
