"""Offline data and plain networks shared by the example studies (train_digits, retrofit_study).

Nothing is downloaded: scikit-learn bundles the digits set and generates the
synthetic one. Every split is stratified 80/20 and standardised on its
training part; the seed of a study changes weights and batch order, never
the split.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def split(x, y, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stratified 80/20 split of numpy arrays, standardised on the training part.

    A feature that is constant in the training part (a digits corner pixel that is
    0 in every training image) is only centred: dividing by its std of 0 (+ a tiny
    epsilon) would turn a test image's value of 1 into 1e6, and every output and
    output difference measured on the test set with it."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return {"x_train": as_x(x_tr), "y_train": torch.tensor(y_tr), "x_test": as_x(x_te),
            "y_test": torch.tensor(y_te)}


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits (1,797 8x8 images), a stratified 80/20 split, standardised on the training part."""
    from sklearn.datasets import load_digits

    return split(*load_digits(return_X_y=True), seed=seed)


def plain_mlp(widths, d_in: int = 64, classes: int = 10) -> nn.Sequential:
    """One Linear + ReLU layer per entry of ``widths``, then a linear head."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.ReLU()]
        d_in = w
    return nn.Sequential(*layers, nn.Linear(d_in, classes))


def digits_mlp(depth: int, width: int = 64) -> nn.Sequential:
    """``depth`` hidden Linear + ReLU layers (the first maps the 64 pixels), then a linear head."""
    return plain_mlp([width] * depth)


def digits_cnn(depth: int, channels: tuple[int, int] = (8, 16)) -> nn.Sequential:
    """``depth`` 3x3 conv + ReLU layers, max-pooling 8x8 -> 4x4 halfway (channels double), then
    global average pooling and a linear head: a plain VGG-style network."""
    c1, c2 = channels
    half = depth // 2
    layers: list[nn.Module] = [nn.Conv2d(1, c1, 3, padding=1), nn.ReLU()]
    for _ in range(half - 1):
        layers += [nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU()]
    layers += [nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU()]
    for _ in range(depth - half - 1):
        layers += [nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10))
