"""Tiny in-repo models for the tests: every family the pass must handle, built in code."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models import plain_mlp, plain_vgg


def plain_cnn() -> nn.Module:
    """VGG-like: conv + BN + ReLU(inplace=True), max-pooling, linear head."""
    return plain_vgg(widths=(8, 8, "M", 16, 16, "M", 32, 32), classes=5)


def mlp_changing_widths() -> nn.Module:
    """Linear + ReLU with widths that change, so projections appear."""
    return plain_mlp(widths=(12, 16, 16, 24, 24, 24, 8, 8), classes=3)


def deep_mlp(depth: int, width: int = 32, classes: int = 10) -> nn.Sequential:
    """``depth`` hidden Linear + ReLU layers of one width, then a linear head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class FunctionalCNN(nn.Module):
    """Functional style: F.relu(..., inplace=True), F.max_pool2d and view, as GoogLeNet writes it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1)
        self.c5 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        x = F.relu(self.c1(x), inplace=True)
        x = F.relu(self.c2(x), inplace=True)
        x = F.max_pool2d(x, 2)
        x = F.relu(self.c3(x), inplace=True)
        x = F.relu(self.c4(x), inplace=True)
        x = F.relu(self.c5(x), inplace=True)
        x = F.max_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class TwoTower(nn.Module):
    """A stem, two parallel towers concatenated, then a trunk: a branching model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 5, padding=2), nn.ReLU())
        self.trunk = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = self.trunk(x)
        return self.head(x.mean(dim=(2, 3)))


class PlainTransformer(nn.Module):
    """Transformer blocks on [B, T, D] with the residual connections left out (post-LN)."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "norm1": nn.LayerNorm(dim),
                "ff1": nn.Linear(dim, 2 * dim), "act": nn.GELU(), "ff2": nn.Linear(2 * dim, dim),
                "norm2": nn.LayerNorm(dim),
            }))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b["norm1"](b["attn"](x, x, x, need_weights=False)[0])
            x = b["norm2"](b["ff2"](b["act"](b["ff1"](x))))
        return x


class ShapeBranchNet(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.b3 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if x.shape[-1] > 8:  # fx: a Proxy in a Python `if`
            x = F.avg_pool2d(x, 2)
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


class DataBranchNet(nn.Module):
    """Control flow on tensor *values*: neither fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class InplaceCNN(nn.Module):
    """conv -> BN -> ReLU(inplace=True): a shortcut reading bn1 sees values the ReLU overwrote."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = F.relu(x, inplace=True) if self.functional else self.relu1(x)
        x = self.bn2(self.conv2(x))
        x = F.relu(x, inplace=True) if self.functional else self.relu2(x)
        return self.bn3(self.conv3(x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


# name -> (builder, example input shapes): the families every stage is tested on.
FAMILIES = {
    "plain_cnn": (plain_cnn, [(2, 3, 16, 16)]),
    "mlp_widths": (mlp_changing_widths, [(4, 12)]),
    "functional_cnn": (FunctionalCNN, [(2, 3, 16, 16)]),
    "two_tower": (TwoTower, [(2, 3, 8, 8)]),
    "transformer": (PlainTransformer, [(2, 5, 8)]),
    "shape_branch": (ShapeBranchNet, [(2, 3, 16, 16)]),
}


def build(name: str, seed: int = 0):
    """(model in eval mode with randomised BN, example inputs) for a family, seeded."""
    builder, shapes = FAMILIES[name]
    torch.manual_seed(seed)
    model = randomize_bn(builder(), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, tuple(torch.randn(s, generator=g) for s in shapes)
