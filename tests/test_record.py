"""One record per model: every reader returns (module, example-input specs, forward kwargs),
a model handed in from Python gets the same record, and capture and surgery read it."""

import ast
from pathlib import Path

import pytest
import torch

from models import plain_cnn
from ressurgeon import (ModelRecord, SkipConfig, add_skips, example_inputs, read_model,
                        record_of, trace_model)

PACKAGE = Path(__file__).resolve().parents[1] / "ressurgeon"


def _exported(tmp_path, batch=2, size=12):
    torch.manual_seed(0)
    model = plain_cnn().eval()
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(batch, 3, size, size),)), path)
    return model, path


def test_a_pt2_record_holds_the_inputs_it_was_exported_with(tmp_path):
    _, path = _exported(tmp_path, batch=2, size=12)
    record = read_model(path)
    assert isinstance(record, ModelRecord) and record.source == "pt2"
    assert record.input_specs == (((2, 3, 12, 12), None),)
    assert dict(record.forward_kwargs) == {} and record.prepare is None
    x, = example_inputs(record)
    assert tuple(x.shape) == (2, 3, 12, 12) and x.dtype is torch.float32
    # the same record, whether read from the file or made from the loaded module
    again = record_of(record.module)
    assert again.input_specs == record.input_specs and again.source == "module"


def test_every_reader_names_itself(tmp_path):
    torch.manual_seed(0)
    model = plain_cnn().eval()
    torch.save(model, tmp_path / "nn.pt")                 # a torch.nn-only pickle
    torch.save(model.state_dict(), tmp_path / "sd.pt")    # weights: need --arch
    assert read_model(tmp_path / "nn.pt").source == "torch.save"
    assert read_model(tmp_path / "nn.pt").input_specs == ()      # nothing recorded
    sd = read_model(tmp_path / "sd.pt", arch="models:plain_cnn")
    assert sd.source == "torch.save"
    got = dict(sd.module.state_dict())
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_a_python_model_gets_an_empty_record_and_add_skips_takes_either():
    torch.manual_seed(0)
    model = plain_cnn().eval()
    record = record_of(model)
    assert (record.input_specs, dict(record.forward_kwargs), record.vocab) == ((), {}, None)
    x = torch.randn(1, 3, 16, 16)
    by_model = add_skips(model, (x,), SkipConfig(span=2, seed=0))
    by_record = add_skips(record, (x,), SkipConfig(span=2, seed=0))
    assert [s.name for s in by_model.skips] == [s.name for s in by_record.skips]
    assert len(by_model.skips) == 2
    assert torch.equal(by_model.module(x), by_record.module(x))
    assert by_record.parity.max_abs_diff <= 1e-5


def test_the_record_is_read_only():
    record = record_of(torch.nn.Linear(4, 2))
    with pytest.raises(TypeError):
        record.forward_kwargs["use_cache"] = True
    with pytest.raises(AttributeError):
        record.source = "pt2"


def test_capture_and_surgery_read_the_record_not_the_hugging_face_module():
    """Item 2 of the architecture issue: trace and surgery ask the record (load/record.py),
    never ``load.hf`` itself."""
    offenders = []
    for folder in ("capture", "skips", "rewire"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("load.hf") \
                        and any(a.name in ("forward_kwargs", "without_cache", "example_specs")
                                for a in node.names):
                    offenders.append(f"{folder}/{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_a_hugging_face_record_says_how_it_is_captured():
    pytest.importorskip("transformers")
    from models import tiny_llama_lm

    model = tiny_llama_lm().eval()
    record = record_of(model)
    assert dict(record.forward_kwargs) == {"use_cache": False}
    assert record.input_specs == (((1, 16), "int64"),) and record.vocab == 64
    assert record.prepare is not None
    ids, = example_inputs(record)
    assert ids.dtype is torch.int64 and int(ids.max()) < 64
    gm = trace_model(record, (ids,))
    assert model.config.use_cache  # the user's model keeps its cache setting
    want = model(ids, use_cache=False).logits
    assert torch.allclose(gm(ids)["logits"], want, atol=1e-5)
