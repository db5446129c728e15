"""Stage 5, verify: does the rewritten model compute what it should, and do gradients flow?

One comparison primitive, ``compare_outputs``, serves every check ressurgeon
makes (the rewrite, fold, ONNX Runtime) with one table of tolerances,
``TOLERANCES``. A value that is finite in the reference and not finite in the
result always fails, whatever the tolerance: ``0 * inf`` is NaN, and NaN
compares false with everything, so a plain ``max`` of differences would hide it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ._torch import eval_mode
from .errors import VerificationError


@dataclass(frozen=True)
class Tolerance:
    """Allowed ``|expected - actual|``: ``atol + rtol * max(1, max |expected|)``."""

    atol: float
    rtol: float = 0.0

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * max(1.0, scale)


# (check, dtype) -> tolerance, with the reason for each.
TOLERANCES: dict[str, dict[torch.dtype, Tolerance]] = {
    # The rewrite in preserve mode adds gate * S(x) with gate = 0, exact in IEEE
    # arithmetic: fp32 gets a bound far below any real change; half precisions
    # leave room for kernels that pick other algorithms for other shapes.
    "rewrite": {
        torch.float64: Tolerance(1e-12),   # exact math, double rounding only
        torch.float32: Tolerance(1e-6),
        torch.bfloat16: Tolerance(1e-2),   # 8-bit mantissa
        torch.float16: Tolerance(1e-3),    # 11-bit mantissa
    },
    # fold merges BatchNorm and kernels and rescales weights: float sums run in
    # another order, so the error scales with the output's magnitude.
    "fold": {
        torch.float64: Tolerance(0.0, 1e-10),
        torch.float32: Tolerance(0.0, 1e-4),
        torch.bfloat16: Tolerance(0.0, 5e-2),
        torch.float16: Tolerance(0.0, 1e-2),
    },
    # ONNX Runtime and PyTorch pick their own conv algorithms (im2col, Winograd,
    # NCHWc blocks); ~100 ulps of float32 at the output scale leave room for 50+
    # layers; --fp16 is compared with the float32 model.
    "onnx": {
        torch.float64: Tolerance(0.0, 1e-8),
        torch.float32: Tolerance(0.0, 1e-4),
        torch.float16: Tolerance(0.0, 2e-2),
        torch.bfloat16: Tolerance(0.0, 6e-2),
    },
}
# The rewrite's absolute tolerances by dtype (documented in the README).
PARITY_ATOL = {dtype: tol.atol for dtype, tol in TOLERANCES["rewrite"].items()}


@dataclass(frozen=True)
class ParityReport:
    """How far outputs are from the reference's (eval mode).

    ``nonfinite``: values that are NaN or infinite in the result but finite in
    the reference (any of them fails the check); ``original_nonfinite``: values
    the reference itself has that are not finite (reported, and they must be
    matched exactly).
    """

    max_abs_diff: float
    tolerance: float
    outputs: int                 # tensors compared
    nonfinite: int = 0
    original_nonfinite: int = 0

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        """One line: the difference and, when there are any, the non-finite values."""
        text = f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        if self.nonfinite:
            text += f"; {self.nonfinite} value(s) became NaN or infinite"
        if self.original_nonfinite:
            text += f"; the original itself has {self.original_nonfinite} non-finite value(s)"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compare_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor], *, check: str,
                    dtype: torch.dtype | None = None) -> ParityReport:
    """Compare output tensors against a reference with the tolerance ``TOLERANCES[check]``.

    Args:
        expected: the reference's output tensors (the original model, the unfolded one).
        actual: the outputs to check, in the same order.
        check: "rewrite", "fold" or "onnx": which row of ``TOLERANCES``.
        dtype: the dtype whose tolerance applies; default the reference's.

    Returns:
        A ParityReport; ``.ok`` is False beyond tolerance or for new non-finite values.

    Raises:
        VerificationError: the outputs differ in number or shape.
    """
    if len(expected) != len(actual):
        raise VerificationError(f"the outputs changed from {len(expected)} tensor(s) to "
                                f"{len(actual)}; this is a ressurgeon bug, please report it")
    table = TOLERANCES[check]
    worst, bound, new_bad, old_bad = 0.0, 0.0, 0, 0
    for want, have in zip(expected, actual):
        if tuple(want.shape) != tuple(have.shape):
            raise VerificationError(f"an output's shape changed from {tuple(want.shape)} to "
                                    f"{tuple(have.shape)}; this is a ressurgeon bug, please "
                                    "report it")
        tol = table.get(dtype or want.dtype, table[torch.float32])
        if not want.numel():
            bound = max(bound, tol.bound(0.0))
            continue
        want, have = want.detach().cpu().double(), have.detach().cpu().double()
        finite = torch.isfinite(want)
        new_bad += int((finite & ~torch.isfinite(have)).sum())
        # where the reference is not finite, the result must be the very same value
        same = (want == have) | (torch.isnan(want) & torch.isnan(have))
        old_bad += int((~finite).sum())
        new_bad += int((~finite & ~same).sum())
        if finite.any():
            diff = (want - have).abs()[finite & torch.isfinite(have)]
            if diff.numel():
                worst = max(worst, diff.max().item())
            bound = max(bound, tol.bound(want[finite].abs().max().item()))
        else:
            bound = max(bound, tol.bound(0.0))
    return ParityReport(max_abs_diff=worst, tolerance=bound, outputs=len(expected),
                        nonfinite=new_bad, original_nonfinite=old_bad)


def check_parity(original: nn.Module, rewritten: nn.Module, example_inputs: tuple, *,
                 check: str = "rewrite", original_kwargs: dict | None = None,
                 rewritten_outputs: list[torch.Tensor] | None = None) -> ParityReport:
    """Run both models in eval mode on the same inputs and compare every output tensor.

    Args:
        original, rewritten: the models to compare; their train/eval modes are restored.
        example_inputs: tuple of tensors.
        check: which row of ``TOLERANCES`` applies ("rewrite" by default).
        original_kwargs: keyword arguments for the original only: the
            ``concrete_args`` the rewritten graph was traced with.
        rewritten_outputs: ``rewritten``'s outputs on these inputs in eval mode,
            when a caller already has them (``watch_shortcut_paths``); not run again.

    Returns:
        A ParityReport (``.ok`` says whether the difference is within tolerance
        and no value became NaN or infinite).

    Raises:
        VerificationError: the two models return different structures or shapes.

    Example:
        >>> check_parity(model, result.module, (x,)).max_abs_diff   # doctest: +SKIP
        0.0
    """
    a = eval_outputs(original, example_inputs, original_kwargs or {})
    b = rewritten_outputs if rewritten_outputs is not None \
        else eval_outputs(rewritten, example_inputs, {})
    return compare_outputs(a, b, check=check)


def eval_outputs(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
    """The model's output tensors in eval mode, on copies of the inputs, its mode restored.

    Copies, because a forward that edits its input in place (``x.sub_(mean)``)
    would otherwise change what the next model sees, and the caller's tensors.
    """
    with eval_mode(model), torch.no_grad():
        out = model(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs),
                    **(kwargs or {}))
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def watch_shortcut_paths(module: nn.Module, inputs: tuple) -> tuple[list[str], list[torch.Tensor]]:
    """The shortcuts whose path ``S(x)`` (their ``proj``'s output) is NaN or infinite,
    and the module's outputs from the same run.

    One eval-mode run with a hook on every shortcut's projection (``nn.Identity``
    for identity shortcuts). A zero gate times an infinite S(x) is NaN, and even
    where the sum hides it, the gate's gradient is lost. The outputs serve the
    parity check when no shortcut had to be taken out.
    """
    from .shortcuts import is_shortcut

    bad: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if is_shortcut(sub) and hasattr(sub, "proj"):
            def hook(_module, _args, output, name=name):
                if isinstance(output, torch.Tensor) and output.is_floating_point() \
                        and not bool(torch.isfinite(output).all()):
                    bad.append(name)
            handles.append(sub.proj.register_forward_hook(hook))
    try:
        outputs = eval_outputs(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(bad)), outputs


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
