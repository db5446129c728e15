"""Plain networks without residual connections: the bundled example models.

Run ``python examples/models.py`` to write them as torch.export archives under
examples/models/ (a second or two), then operate on them with the CLI:

    ressurgeon add-skips examples/models/vgg.pt2 --input-shape 1,3,32,32 -o vgg_skips.pt2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_WIDTHS = (32, 32, "M", 64, 64, "M", 128, 128, 128, 128)
MLP_WIDTHS = (64, 128, 128, 128, 128, 64, 64, 64, 64)


def plain_vgg(widths=VGG_WIDTHS, in_channels: int = 3, classes: int = 10,
              inplace: bool = True) -> nn.Sequential:
    """A VGG-style CNN: 3x3 conv + BatchNorm + ReLU blocks, max-pooling, a linear head."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=inplace)]
        c = w
    features = nn.Sequential(*layers)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def plain_mlp(widths=MLP_WIDTHS, classes: int = 10) -> nn.Sequential:
    """A deep MLP of Linear + ReLU layers with changing widths and a linear head."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], classes))


class EncoderDecoder(nn.Module):
    """A plain encoder-decoder without skips (U-Net's shape, none of its concatenations).

    ``widths`` per level, two conv + BN + ReLU per level (``enc_convs``/``dec_convs``
    to make them unequal); max-pooling down; ``up`` is how the decoder goes up:
    "transpose" (ConvTransposeNd, k2 s2, then ReLU), "upsample" (nn.Upsample),
    "interpolate" (F.interpolate) or "shuffle" (1x1 conv to 4x channels + PixelShuffle,
    2-D only); a 1x1 conv head. ``dims`` 1, 2 or 3.
    """

    def __init__(self, dims: int = 2, widths=(8, 16, 32), up: str = "transpose",
                 in_channels: int = 3, classes: int = 4, enc_convs: int = 2, dec_convs: int = 2):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                    3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
        transpose = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]

        def block(cin, cout, n):
            layers = []
            for i in range(n):
                layers += [conv(cin if i == 0 else cout, cout, 3, padding=1), bn(cout), nn.ReLU()]
            return nn.Sequential(*layers)

        self.up_kind = up
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(block(cin, w, enc_convs))
            cin = w
        self.pool = pool(2)
        self.ups, self.dec = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths[:-1]):
            if up == "transpose":
                self.ups.append(nn.Sequential(transpose(cin, w, 2, stride=2), nn.ReLU()))
                self.dec.append(block(w, w, dec_convs))
            elif up == "shuffle":
                self.ups.append(nn.Sequential(conv(cin, 4 * w, 1), nn.PixelShuffle(2)))
                self.dec.append(block(w, w, dec_convs))
            else:
                self.ups.append(nn.Upsample(scale_factor=2) if up == "upsample" else nn.Identity())
                self.dec.append(block(cin, w, dec_convs))
            cin = w
        self.head = conv(cin, classes, 1)

    def forward(self, x):
        for i, level in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = level(x)
        for up, level in zip(self.ups, self.dec):
            x = up(x)
            if self.up_kind == "interpolate":
                x = F.interpolate(x, scale_factor=2.0)
            x = level(x)
        return self.head(x)


def save_examples(folder: Path) -> list[Path]:
    """Export the example models to ``folder`` as .pt2 archives; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    models = {"vgg.pt2": (plain_vgg(), (torch.randn(2, 3, 32, 32),)),
              "mlp.pt2": (plain_mlp(), (torch.randn(4, MLP_WIDTHS[0]),))}
    batch = torch.export.Dim("batch", min=1)  # the archives take any batch size
    paths = []
    for name, (model, inputs) in models.items():
        ep = torch.export.export(model.eval(), inputs, dynamic_shapes=({0: batch},))
        torch.export.save(ep, folder / name)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models",
                        help="folder for the .pt2 archives (default: examples/models)")
    for path in save_examples(parser.parse_args().out):
        print(path)
