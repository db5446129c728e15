"""Example inputs built by the library (ressurgeon.inputs), as the CLI and studies use them."""

import pytest
import torch
import torch.nn as nn

from ressurgeon import ConfigError
from ressurgeon.inputs import MAX_INPUT_BYTES, example_inputs, real_inputs, stored_inputs


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids, scale):
        return self.head(self.embed(ids)) * scale


def test_specs_give_seeded_inputs_of_their_shapes_and_dtypes():
    model = Tokens()
    ids, scale = example_inputs(model, [((2, 8), "int64"), ((1,), None)], dtype=torch.float64)
    assert ids.shape == (2, 8) and ids.dtype == torch.int64
    assert scale.shape == (1,) and scale.dtype == torch.float64
    assert 0 <= int(ids.min()) and int(ids.max()) < 11   # drawn below the embedding's size
    again = example_inputs(model, [((2, 8), "int64"), ((1,), None)], dtype=torch.float64)
    assert torch.equal(ids, again[0]) and torch.equal(scale, again[1])
    small, = example_inputs(model, [((64,), "int64")], vocab=3)
    assert int(small.max()) < 3


def test_exported_shapes_are_the_default_and_meta_inputs_become_real():
    model = nn.Sequential(nn.Linear(6, 3))
    gm = torch.export.export(model, (torch.randn(4, 6),)).module()
    assert stored_inputs(gm) == [((4, 6), None)]
    meta, = example_inputs(gm, None, device="meta")
    assert meta.device.type == "meta" and meta.shape == (4, 6)
    real, = real_inputs(model, (meta,))
    assert real.device.type == "cpu" and torch.equal(real, example_inputs(model, [((4, 6), None)])[0])


def test_missing_or_oversized_specs_are_refused():
    with pytest.raises(ConfigError, match="cannot tell the input shape of net.pt"):
        example_inputs(nn.Linear(2, 2), None, what="net.pt")
    side = int((MAX_INPUT_BYTES // 8) ** 0.5) + 1
    with pytest.raises(ConfigError, match="GiB of example input"):
        example_inputs(nn.Linear(2, 2), [((side, side), None)])
    with pytest.raises(ConfigError, match="--vocab 0"):
        example_inputs(Tokens(), [((1, 2), "int64")], vocab=0)
