"""The shortcut modules that the rewrite inserts: R = combine(H(x), S(x))."""

from __future__ import annotations

import torch
import torch.nn as nn


class Shortcut(nn.Module):
    """Joins a span's output ``h`` with a shortcut ``S(x)`` from the span's input ``x``.

    init "preserve": ``h + gate * S(x)``, gate = 0, the model computes what it did;
    init "standard": ``h + S(x)``, the classic residual block;
    init "rezero":   ``S(x) + gate * h``, gate = 0, the span starts as identity.

    ``proj`` is ``nn.Identity`` for identity shortcuts, a 1x1 ConvNd or a Linear
    for projections; its weights are PyTorch's default init (never zero, so a
    zero gate still receives a gradient).

    Example:
        >>> s = Shortcut("preserve")
        >>> h, x = torch.ones(2, 3), torch.full((2, 3), 5.0)
        >>> torch.equal(s(h, x), h)
        True
    """

    def __init__(self, init: str, proj: nn.Module | None = None):
        super().__init__()
        if init not in ("preserve", "standard", "rezero"):
            raise ValueError(f"unknown shortcut init {init!r}")
        self.init = init
        self.proj = proj if proj is not None else nn.Identity()
        if init == "standard":
            self.register_parameter("gate", None)
        else:
            self.gate = nn.Parameter(torch.zeros(()))

    @property
    def kind(self) -> str:
        return "identity" if isinstance(self.proj, nn.Identity) else "projection"

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.proj(x)
        if self.init == "preserve":
            return h + self.gate * s
        if self.init == "rezero":
            return s + self.gate * h
        return h + s

    def extra_repr(self) -> str:
        return f"init={self.init!r}"


def is_shortcut_class(cls) -> bool:
    """True for Shortcut itself or its qualified name (as torch.export records it)."""
    if isinstance(cls, type):
        return issubclass(cls, Shortcut)
    return cls == f"{Shortcut.__module__}.{Shortcut.__qualname__}"


def exported_shortcut_path(node) -> str | None:
    """The Shortcut module path an inlined (torch.export'ed) fx node came from, if any.

    torch.export flattens Shortcut modules into plain ops but records the
    module stack in ``node.meta["nn_module_stack"]``; the innermost Shortcut
    on it is the one the node belongs to.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if is_shortcut_class(cls):
            return path
    return None
