"""Strided shortcuts follow the span's size formula at every input size, odd ones included.

A 1x1 stride-2 projection gives ceil(H/2) positions where ``MaxPool2d(2)`` gives
floor(H/2) (and ``MaxPool2d(3, 2, ceil_mode=True)`` ceil((H-1)/2)): a model rewritten
at 32 px used to fail at 31, 33 and 35 px with a raw size mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ressurgeon import SkipConfig, add_skips, fold
from ressurgeon.errors import ShapeError
from ressurgeon.shortcuts import Shortcut

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import plain_vgg  # noqa: E402  (README's VGG-style example)


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze 1x1, then expand 1x1 and 3x3 concatenated."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1(x)), torch.relu(self.expand3(x))], 1)


def squeezenet_like() -> nn.Sequential:
    """squeezenet1_0's layout in small: ceil-mode max-pools between fire modules."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16, 4, 8), Fire(16, 4, 8),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16, 6, 12), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(24, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def strided(result) -> int:
    return sum(s.stride > 1 for s in result.skips)


@pytest.mark.parametrize("init", ["preserve", "standard"])
def test_readme_vgg_rewritten_at_32px_runs_at_odd_sizes(init):
    torch.manual_seed(0)
    model = plain_vgg().eval()
    result = add_skips(model, (torch.randn(2, 3, 32, 32),), SkipConfig(init=init))
    assert strided(result) >= 1
    for size in (31, 33, 35, 29):
        x = torch.randn(2, 3, size, size)
        got = result.module(x)
        assert got.shape == (2, 10)
        if init == "preserve":  # closed gates: the original's output, bitwise
            assert torch.equal(got, model(x))


def test_squeezenet_like_replica_at_five_sizes():
    model = squeezenet_like()
    result = add_skips(model, (torch.randn(1, 3, 64, 64),), SkipConfig(span=2))
    assert strided(result) >= 1
    with torch.no_grad():
        for m in result.module.modules():
            if isinstance(m, Shortcut) and m.gate is not None:
                m.gate.fill_(0.5)   # open: the projection's values reach the output
    for size in (64, 72, 96, 67, 81):
        x = torch.randn(1, 3, size, size)
        assert result.module(x).shape == (1, 10)
    folded = fold(result.module, (torch.randn(1, 3, 64, 64),))
    for size in (72, 67):
        x = torch.randn(1, 3, size, size)
        torch.testing.assert_close(folded.module(x), result.module(x), rtol=1e-4, atol=1e-4)


def test_the_crop_keeps_the_positions_the_span_reads():
    # a 1x1 stride-2 projection reads input position 2i; MaxPool2d(2)'s output i reads 2i, 2i+1
    from ressurgeon.shortcuts.base import fit_spatial
    proj = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    nn.init.ones_(proj.weight)
    x = torch.arange(49.0).view(1, 1, 7, 7)
    h = nn.MaxPool2d(2)(x)
    s = fit_spatial(proj(x), h)
    assert s.shape == h.shape == (1, 1, 3, 3)
    assert torch.equal(s, x[:, :, 0:6:2, 0:6:2])


def test_a_span_larger_than_the_projection_is_named():
    from ressurgeon.shortcuts.base import fit_spatial
    with pytest.raises(ShapeError, match=r"\(4, 4\) where the span gives \(5, 5\)"):
        fit_spatial(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 5, 5))
