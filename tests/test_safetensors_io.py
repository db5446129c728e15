"""The one safetensors reader: the same tensors as the safetensors package reads, torch only."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ressurgeon import LoadError
from ressurgeon.safetensors_io import find_checkpoint, read_checkpoint, read_config, read_safetensors


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(3, 4, generator=g), "f64": torch.randn(2, generator=g).double(),
            "f16": torch.randn(5, generator=g).half(),
            "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "i64": torch.arange(-3, 3), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "u8": torch.tensor([0, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 7)}


def test_reads_what_the_safetensors_package_reads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), name


def test_sharded_folder_and_config(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / shard))
    import json
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {n: s for s, p in shards.items() for n in p}}))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    found = find_checkpoint(tmp_path, "model")
    assert [p.name for p in found.files] == sorted(shards)
    state = read_checkpoint(tmp_path)
    assert sorted(state) == names and all(torch.equal(state[n], tensors[n]) for n in names)
    assert read_config(tmp_path) == {"model_type": "llama", "num_hidden_layers": 2}
    assert read_config(tmp_path / "missing") is None


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LoadError, match="not a valid safetensors file"):
        read_safetensors(path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="not a JSON object"):
        read_config(tmp_path)
