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
