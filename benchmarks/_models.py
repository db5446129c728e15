"""The inference benchmarks' CNN in its forms, built in one place for bench_onnx and bench_gpu.

A 20-conv VGG-like CNN with BatchNorm (plain), the same network written by
hand with residual blocks where ``add_skips(span=2)`` puts its shortcuts (the
twin: what a user would otherwise write), and the two ``add_skips`` results
the benchmarks compare with them. The twin lives here alone so that a change
of ressurgeon's placement rule is mirrored by editing one function, and
``build_cnns`` refuses a twin whose block count no longer matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import plain_vgg
from ressurgeon import SkipConfig, add_skips, fold
from ressurgeon.shortcuts import is_shortcut

STAGES = (32, 64, 128, 256)
PER_STAGE = 5
WIDTHS = tuple(w for stage in STAGES for w in ("M",) * (stage != STAGES[0]) + (stage,) * PER_STAGE)
TRAINED_GATES = (0.3, 0.7)   # gate range after fine-tuning: nonzero, so fold cannot drop them


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """relu(body(x) + shortcut(x)); the body ends in conv + BN, as in ResNet v1."""

    def __init__(self, *body: nn.Module, proj: nn.Module | None = None):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = proj if proj is not None else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def hand_written_resnet(classes: int = 10) -> nn.Sequential:
    """The plain CNN's 20 convs with residual blocks where add_skips(span=2) puts them.

    As a designer writes them (and as ressurgeon now places them): a block right
    after a max-pool reads the pooled tensor, so its shortcut is an unstrided 1x1
    projection (ResNet's option B); a block with the pool inside reads its input
    before the pool and projects with stride 2.
    """
    relu, pool = nn.ReLU, lambda: nn.MaxPool2d(2)

    def proj(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    return nn.Sequential(
        conv_bn(3, 32), relu(),
        Block(conv_bn(32, 32), relu(), conv_bn(32, 32)),
        Block(conv_bn(32, 32), relu(), conv_bn(32, 32)),
        pool(), Block(conv_bn(32, 64), relu(), conv_bn(64, 64), proj=proj(32, 64)),
        Block(conv_bn(64, 64), relu(), conv_bn(64, 64)),
        Block(conv_bn(64, 64), relu(), pool(), conv_bn(64, 128), proj=proj(64, 128, 2)),
        Block(conv_bn(128, 128), relu(), conv_bn(128, 128)),
        Block(conv_bn(128, 128), relu(), conv_bn(128, 128)),
        pool(), Block(conv_bn(128, 256), relu(), conv_bn(256, 256), proj=proj(128, 256)),
        Block(conv_bn(256, 256), relu(), conv_bn(256, 256)),
        conv_bn(256, 256), relu(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes))


def calibrate(model: nn.Module, size: int) -> nn.Module:
    """Give BatchNorm realistic running statistics (no tiny or denormal activations)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def set_trained_gates(module: nn.Module, low: float = TRAINED_GATES[0],
                      high: float = TRAINED_GATES[1]) -> nn.Module:
    """Spread the gates of a ``preserve`` model evenly over [low, high], as fine-tuning leaves them.

    Zero gates (preserve's start) would let fold drop the shortcuts outright,
    which says nothing about what a trained model costs.
    """
    gated = [m for m in module.modules() if is_shortcut(m) and m.gate is not None]
    with torch.no_grad():
        for m, value in zip(gated, np.linspace(low, high, len(gated))):
            m.gate.fill_(float(value))
    return module


@dataclass
class Cnns:
    """The CNN in its forms: float32, eval mode, on the CPU; ``example`` is 1x3xSxS."""

    example: torch.Tensor
    plain: nn.Module
    twin: nn.Module           # hand_written_resnet, calibrated
    standard: nn.Module       # add_skips(plain, span 2, init="standard").module
    preserve: nn.Module       # add_skips(plain, span 2, init="preserve").module, gates 0
    trained: nn.Module        # the same with set_trained_gates


def build_cnns(size: int, seed: int = 0) -> Cnns:
    """Every form at input size ``size``, seeded, BatchNorm calibrated at that size.

    Raises:
        AssertionError: the twin has a different number of residual blocks than
            add_skips inserts shortcuts, i.e. the twin no longer mirrors the pass.
    """
    torch.manual_seed(seed)
    x = torch.randn(1, 3, size, size)
    plain = calibrate(plain_vgg(WIDTHS, classes=10), size)
    twin = calibrate(hand_written_resnet(), size)
    standard = add_skips(plain, (x,), SkipConfig(span=2, init="standard"))
    blocks = sum(isinstance(m, Block) for m in twin.modules())
    assert len(standard.skips) == blocks, (len(standard.skips), blocks)
    preserve = add_skips(plain, (x,), SkipConfig(span=2, init="preserve"))
    trained = add_skips(plain, (x,), SkipConfig(span=2, init="preserve"))
    return Cnns(example=x, plain=plain, twin=twin, standard=standard.module,
                preserve=preserve.module, trained=set_trained_gates(trained.module))


def gates_left_after_fold(module: nn.Module, inputs: tuple) -> tuple[int, list[str]]:
    """Count the gates ``fold`` must keep as a Mul, with fold's reason for each.

    A kept gate costs an element-wise Mul at inference and stops ONNX Runtime
    and TensorRT from fusing the shortcut's Add into the convolution, so this
    is the number a deployment cares about after fine-tuning a ``preserve``
    model (give it trained, nonzero gates: zero gates are simply removed).

    Args:
        module: an ``add_skips(...).module`` (or any model fold accepts); not modified.
        inputs: example inputs, as for ``fold``.

    Returns:
        (count, reasons): reasons in shortcut order, one per kept gate.

    Example:
        >>> trained = add_skips(model, (x,), SkipConfig(init="preserve")).module  # doctest: +SKIP
        >>> gates_left_after_fold(trained, (x,))                                  # doctest: +SKIP
        (0, [])
    """
    return kept_gates(fold(module, inputs))


def kept_gates(folded) -> tuple[int, list[str]]:
    """``gates_left_after_fold`` for a FoldResult already computed."""
    reasons = [s.reason or "" for s in folded.skips if s.outcome == "kept"]
    return len(reasons), reasons
