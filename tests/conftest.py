"""Shared fixtures: the bundled example models, written once per test session."""

import pytest
import torch

from examples.models import save_examples


@pytest.fixture(scope="session")
def example_models(tmp_path_factory):
    """{'vgg': path, 'mlp': path} of freshly exported .pt2 archives."""
    folder = tmp_path_factory.mktemp("examples")
    paths = save_examples(folder)
    return {p.stem: p for p in paths}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
