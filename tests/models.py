"""Tiny in-repo models for the tests: every family the pass must handle, built in code."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models import EncoderDecoder, plain_mlp, plain_vgg


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


# -- real architectures, in miniature (issue 6) --------------------------------------------
# Each mimics the structure of a common family at a size that runs in milliseconds.


def alexnet_like() -> nn.Sequential:
    """AlexNet: a large strided first kernel, max-pooling, then a Dropout/Linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(128, 64), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 5))


class ConvBN(nn.Module):
    """GoogLeNet's BasicConv2d: conv, BN, then F.relu(inplace=True)."""

    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.act else x


class Inception(nn.Module):
    """Four parallel towers (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1) joined by a concat."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = ConvBN(cin, 8)
        self.b2 = nn.Sequential(ConvBN(cin, 8), ConvBN(8, 12, 3))
        self.b3 = nn.Sequential(ConvBN(cin, 4), ConvBN(4, 8, 3), ConvBN(8, 8, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBN(cin, 4))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionLike(nn.Module):
    """GoogLeNet: a stem, two Inception modules, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 16, 3), ConvBN(16, 16, 3))
        self.mix1, self.mix2 = Inception(16), Inception(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.mix2(self.mix1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    """DenseNet's BN-ReLU-1x1 conv, BN-ReLU-3x3 conv on the concat of every earlier output."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x), inplace=True))
        return self.conv2(F.relu(self.norm2(x), inplace=True))


class DenseNetLike(nn.Module):
    """DenseNet: two dense blocks (concatenation, no addition) joined by a transition."""

    def __init__(self, growth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = nn.ModuleList([DenseLayer(16 + i * growth, growth) for i in range(3)])
        c = 16 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                        nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        c //= 2
        self.block2 = nn.ModuleList([DenseLayer(c + i * growth, growth) for i in range(2)])
        c += 2 * growth
        self.norm, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 5)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.block1:
            features.append(layer(features))
        features = [self.transition(torch.cat(features, 1))]
        for layer in self.block2:
            features.append(layer(features))
        x = F.relu(self.norm(torch.cat(features, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate: pool to 1x1, two 1x1 convs, scale the input by a sigmoid."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, (SE), linear 1x1 projection; x + F(x) when it fits."""

    def __init__(self, cin, cout, stride, expand, se=False):
        super().__init__()
        mid = cin * expand
        layers = [ConvBN(cin, mid)] if expand != 1 else []
        layers += [ConvBN(mid, mid, 3, stride, groups=mid)]
        if se:
            layers.append(SqueezeExcite(mid))
        layers.append(ConvBN(mid, cout, act=False))
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetLike(nn.Module):
    """MobileNetV2/V3: depthwise-separable blocks, some with inverted residuals, some with SE."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 8, 1, 1),             # no residual: 16 -> 8 channels
            InvertedResidual(8, 12, 2, 4),             # no residual: stride 2
            InvertedResidual(12, 12, 1, 4, se=True),   # residual, with SE
            InvertedResidual(12, 16, 1, 4, se=True),   # no residual: 12 -> 16, with SE
            InvertedResidual(16, 16, 1, 4, se=True))   # residual, with SE
        self.last = ConvBN(16, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """ResNet's basic block: written with ``out += identity`` and ReLU(inplace=True)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    """ResNet: a stem and three basic blocks (identity, projection, identity shortcuts)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    """ViT's attention: one qkv Linear, scaled dot-product written out, an output Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-LN transformer block on [B, N, D] tokens; ``residual=False`` leaves the adds out."""

    def __init__(self, dim, heads, residual):
        super().__init__()
        self.residual = residual
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        y = self.attn(self.norm1(x))
        x = x + y if self.residual else y
        y = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + y if self.residual else y


class ViTLike(nn.Module):
    """ViT: patch embedding, class token, position embedding, blocks, head on the class token."""

    def __init__(self, residual: bool = True, dim: int = 16, depth: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, 2, residual) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7 (channels first), then LayerNorm and an MLP channels-last."""

    def __init__(self, dim, residual):
        super().__init__()
        self.residual = residual
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = y.permute(0, 3, 1, 2)
        return x + y if self.residual else y


class ConvNeXtLike(nn.Module):
    """ConvNeXt: patchify stem, two stages of blocks, a strided 2x2 conv between them."""

    def __init__(self, residual: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.stage1 = nn.Sequential(ConvNeXtBlock(16, residual), ConvNeXtBlock(16, residual))
        self.down = nn.Conv2d(16, 32, 2, 2)
        self.stage2 = nn.Sequential(ConvNeXtBlock(32, residual), ConvNeXtBlock(32, residual))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


@torch.fx.wrap
def window_attention(x, qkv_weight, proj_weight, heads: int, window: int):
    """Swin-style windowed self-attention on [B, H, W, C]; fx keeps it opaque (torch.fx.wrap)."""
    b, h, w, c = x.shape
    if h % window or w % window:  # Python control flow on shapes: fx could not trace this
        raise ValueError("window must divide the feature map")
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, window * window, c)
    qkv = F.linear(x, qkv_weight).reshape(x.shape[0], -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, window * window, c)
    x = F.linear(x, proj_weight).reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class SwinBlock(nn.Module):
    """Swin: channels-last [B, H, W, C], opaque window attention, an MLP, both residual."""

    def __init__(self, dim, heads=2, window=2):
        super().__init__()
        self.heads, self.window = heads, window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5)
        self.proj = nn.Parameter(torch.randn(dim, dim) * dim ** -0.5)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + window_attention(self.norm1(x), self.qkv, self.proj, self.heads, self.window)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class SwinLike(nn.Module):
    """Swin: patch embedding, channels-last stages joined by patch merging (2x2 -> Linear)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, 2)
        self.stage1 = nn.Sequential(SwinBlock(16), SwinBlock(16))
        self.merge_norm, self.merge = nn.LayerNorm(64), nn.Linear(64, 32, bias=False)
        self.stage2 = nn.Sequential(SwinBlock(32), SwinBlock(32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stage1(self.patch(x).permute(0, 2, 3, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.stage2(self.merge(self.merge_norm(x)))
        return self.head(x.mean(dim=(1, 2)))


class PlainChannelsLast(nn.Module):
    """A plain (no residual) MLP on channels-last feature maps [B, H, W, C], widths changing."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        widths = (16, 16, 32, 32, 32, 16)
        self.mlp = nn.Sequential(*[m for a, b in zip(widths, widths[1:])
                                   for m in (nn.Linear(a, b), nn.LayerNorm(b), nn.GELU())])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.mlp(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean(dim=(1, 2)))


def audio_net() -> nn.Sequential:
    """1-D conv audio net (M5-like) on raw waveforms [B, 1, T]: strided convs, max-pooling."""
    def block(cin, cout, k=3, stride=1):
        return [nn.Conv1d(cin, cout, k, stride, k // 2), nn.BatchNorm1d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 8, 9, 4), nn.MaxPool1d(2), *block(8, 8), *block(8, 8),
                         *block(8, 16), *block(16, 16, 3, 2), *block(16, 16),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5))


def video_net() -> nn.Sequential:
    """3-D conv video net (C3D-like) on clips [B, 3, T, H, W]."""
    def block(cin, cout, stride=1):
        return [nn.Conv3d(cin, cout, 3, stride, 1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 8), *block(8, 8), *block(8, 16, 2), *block(16, 16),
                         *block(16, 16), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 5))


class TwoInTwoOut(nn.Module):
    """Several inputs and outputs: an image and a vector in, a dict of two heads out."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.vector = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                   nn.Linear(32, 32), nn.ReLU())
        self.logits, self.embed = nn.Linear(32, 4), nn.Linear(32, 8)

    def forward(self, img, vec):
        z = torch.cat([self.image(img).mean(dim=(2, 3)), self.vector(vec)], dim=1)
        z = self.trunk(z)
        return {"logits": self.logits(z), "embedding": self.embed(z)}


# name -> (builder, example input shapes): real architectures in miniature (test_architectures).
ARCHITECTURES = {
    "vgg": (plain_cnn, [(2, 3, 16, 16)]),
    "alexnet": (alexnet_like, [(2, 3, 32, 32)]),
    "inception": (InceptionLike, [(2, 3, 8, 8)]),
    "densenet": (DenseNetLike, [(2, 3, 8, 8)]),
    "mobilenet": (MobileNetLike, [(2, 3, 16, 16)]),
    "resnet": (ResNetLike, [(2, 3, 8, 8)]),
    "vit": (ViTLike, [(2, 3, 16, 16)]),
    "vit_plain": (lambda: ViTLike(residual=False), [(2, 3, 16, 16)]),
    "convnext": (ConvNeXtLike, [(2, 3, 16, 16)]),
    "convnext_plain": (lambda: ConvNeXtLike(residual=False), [(2, 3, 16, 16)]),
    "swin": (SwinLike, [(2, 3, 8, 8)]),
    "channels_last_mlp": (PlainChannelsLast, [(2, 3, 8, 8)]),
    "audio_1d": (audio_net, [(2, 1, 256)]),
    "video_3d": (video_net, [(2, 3, 4, 8, 8)]),
    "two_in_two_out": (TwoInTwoOut, [(2, 3, 8, 8), (2, 6)]),
}


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
    """(model in eval mode with randomised BN, example inputs) for a family or architecture, seeded."""
    builder, shapes = FAMILIES[name] if name in FAMILIES else ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = randomize_bn(builder(), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, tuple(torch.randn(s, generator=g) for s in shapes)


class PosMLP(nn.Module):
    """Python control flow on a shape (fx fails, torch.export captures it) and a position table
    sliced by the sequence length: the capture depends on a non-batch dim."""

    def __init__(self, positions: int = 8, width: int = 16, depth: int = 4):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(positions, width))
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        if x.dim() == 3:
            x = x + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class TokenStack(nn.Module):
    """A BERT-like encoder without residuals on token ids: an embedding, positions from the
    sequence length, a length check (as Hugging Face models write it) and plain blocks."""

    def __init__(self, vocab: int = 50, positions: int = 16, width: int = 32, depth: int = 4):
        super().__init__()
        self.positions = positions
        self.tokens = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(ViTBlock(width, heads=2, residual=False) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, ids):
        if ids.shape[1] > self.positions:
            raise ValueError("sequence longer than the position table")
        x = self.tokens(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


# -- the ResNet paper's plain baselines (He et al. 2016, Table 1), built without torchvision ----

class PlainBasic(nn.Module):
    """ResNet's basic block with its shortcut removed: conv3x3-BN-ReLU, conv3x3-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class PlainBottleneck(nn.Module):
    """ResNet-50's bottleneck with its shortcut removed: 1x1, 3x3 (stride, as torchvision), 1x1 x4."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)))


class PlainResNet(nn.Module):
    """The paper's plain-18/34 (basic blocks) and a plain ResNet-50 (bottlenecks): the same
    layers as torchvision's ResNet, every residual add left out."""

    def __init__(self, blocks: tuple[int, ...], bottleneck: bool = False, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for b in range(count):
                stride = 2 if i > 0 and b == 0 else 1
                if bottleneck:
                    layers.append(PlainBottleneck(cin, width, stride))
                    cin = 4 * width
                else:
                    layers.append(PlainBasic(cin, width, stride))
                    cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def plain18() -> PlainResNet:
    return PlainResNet((2, 2, 2, 2))


def plain34() -> PlainResNet:
    return PlainResNet((3, 4, 6, 3))


def plain50() -> PlainResNet:
    return PlainResNet((3, 4, 6, 3), bottleneck=True)


class ResidualMLPBlock(nn.Module):
    """``x + f(x)`` on features, written four ways: pre-norm (a copy can be the identity),
    post-norm ``norm(x + f(x))``, a branch that ends in a sigmoid, and a scaled skip ``x/2``
    (the last three cannot start as the identity)."""

    def __init__(self, width: int, kind: str = "pre"):
        super().__init__()
        self.kind = kind
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), \
            nn.Linear(2 * width, width)

    def forward(self, x):
        if self.kind == "post":
            return self.norm(x + self.fc2(F.gelu(self.fc1(x))))
        h = self.fc2(F.gelu(self.fc1(self.norm(x))))
        if self.kind == "sigmoid":
            return x + torch.sigmoid(h)
        return x * 0.5 + h if self.kind == "scaled" else x + h


class ResidualMLP(nn.Module):
    """A stem, ``depth`` ResidualMLPBlocks of one kind in a ModuleList, a head."""

    def __init__(self, kind: str = "pre", width: int = 16, depth: int = 4, classes: int = 5):
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, kind) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_llama_lm():
    """A 4-layer Llama language model (vocab 64, width 32, 4 heads, 2 KV heads), seed 0.

    Needs transformers: callers ``pytest.importorskip("transformers")`` first.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config)


class LSTMList(nn.Module):
    """A ModuleList of equal-width one-layer LSTMs after an input Linear, then a linear head."""

    def __init__(self, depth: int = 5, width: int = 16, features: int = 4, classes: int = 3,
                 batch_first: bool = True):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.rnns = nn.ModuleList(nn.LSTM(width, width, batch_first=batch_first)
                                  for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.head(x)


class PackedLSTM(nn.Module):
    """One multi-layer nn.LSTM (sequence-first), read by a head on every step."""

    def __init__(self, layers: int = 4, width: int = 16, features: int = 4, classes: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, dropout=dropout)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


class BiGRUStack(nn.Module):
    """Bidirectional one-layer GRUs (output 2H), one width change among them, batch first."""

    def __init__(self, hidden: tuple[int, ...] = (8, 8, 12, 12), features: int = 4,
                 classes: int = 3):
        super().__init__()
        widths = [features, *(2 * h for h in hidden)]
        self.grus = nn.ModuleList(nn.GRU(w, h, batch_first=True, bidirectional=True)
                                  for w, h in zip(widths, hidden))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for gru in self.grus:
            x = gru(x)[0]
        return self.head(x)
class PreNormBlock(nn.Module):
    """A pre-norm transformer block, timm's layout: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    """Causal multi-head self-attention on [B, T, D] (one fused qkv projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class PreNormTransformer(nn.Module):
    """A byte-level pre-norm transformer language model with a ``blocks`` ModuleList (no
    transformers): embedding + positions, ``depth`` PreNormBlocks, final norm, head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, depth: int = 4,
                 positions: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(positions, dim) * 0.02)
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_gpt2_lm():
    """A 4-layer GPT-2 language model (vocab 64, width 32, 4 heads), seed 0.

    Needs transformers: callers ``pytest.importorskip("transformers")`` first.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4,
                                     n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(config)
def encoder_decoder(**kwargs) -> EncoderDecoder:
    """An EncoderDecoder with random BatchNorm statistics, in eval mode."""
    return randomize_bn(EncoderDecoder(**kwargs)).eval()


class Detector(nn.Module):
    """A plain CNN backbone inside a forward that neither fx nor torch.export can capture.

    The forward branches on a tensor's value and returns a dict with a list
    whose length depends on the data, as detection models' post-processing does.
    """

    def __init__(self):
        super().__init__()
        self.backbone = plain_vgg(widths=(8, 8, "M", 16, 16, 16), classes=1)[0]
        self.head = nn.Conv2d(16, 5, 1)
        self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, x):
        scores = self.head(self.backbone(x))
        if scores.mean() > self.threshold:  # data-dependent Python: no capture
            scores = scores - scores.mean()
        peaks = [s for s in scores.amax(dim=(2, 3)).flatten() if s > 0]
        return {"scores": scores, "peaks": torch.stack(peaks) if peaks else scores.new_zeros(0)}

    def decode(self, out: dict) -> int:
        """A method of the user's class (must survive the splice)."""
        return int(out["peaks"].numel())


def detector() -> Detector:
    """A Detector with random BatchNorm statistics, in eval mode (``--arch models:detector``)."""
    torch.manual_seed(0)
    return randomize_bn(Detector()).eval()
