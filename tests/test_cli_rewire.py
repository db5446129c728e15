"""ressurgeon rewire: a Hugging Face folder in, an adapter folder out."""

import json

import pytest
import torch

from helpers import one_line_error, run_cli
from models import tiny_llama_lm

from ressurgeon import load_adapter


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "llama"
    tiny_llama_lm().save_pretrained(folder)
    return folder


def test_rewire_writes_an_adapter_that_loads_onto_the_base(llama_folder, tmp_path):
    out = tmp_path / "adapter"
    result = run_cli("rewire", llama_folder, "--kind", "hyper", "-n", "2", "--dynamic",
                     "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parity"]["max_abs_diff"] == 0.0 and report["exact"]
    assert report["blocks"] == [f"model.layers.{i}" for i in range(4)]
    assert report["params_added"] == 4 * 2 * (2 * 3 + 2 + 32 * 3 + 32 + 2)
    assert sorted(p.name for p in out.iterdir()) == ["rewire.safetensors", "rewire_config.json"]
    base = tiny_llama_lm().eval()
    rewired = load_adapter(base, out)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(rewired(ids, use_cache=False).logits, base(ids, use_cache=False).logits)


def test_rewire_dwa_table_and_list(llama_folder, tmp_path):
    result = run_cli("rewire", llama_folder, "--kind", "dwa", "--dilation", "4", "--period", "5",
                     "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "model.layers.3" in result.stdout and "outputs unchanged" in result.stderr
    listing = run_cli("rewire", llama_folder, "--list", "--json")
    assert listing.exit_code == 0, listing.output
    rows = json.loads(listing.stdout)["blocks"]
    assert [r["hyper_form"] for r in rows] == ["llama"] * 4
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, needle", [
    (["--kind", "dense"], "kind must be one of"),
    (["--kind", "dwa", "-n", "2"], "apply to kind='hyper' only"),
    (["--kind", "hyper", "--dilation", "2"], "apply to kind='dwa' only"),
])
def test_rewire_bad_flags_are_one_line_errors(llama_folder, tmp_path, args, needle):
    line = one_line_error(run_cli("rewire", llama_folder, *args, "-o", tmp_path / "x"))
    assert needle in line
    assert not (tmp_path / "x").exists()


def test_rewire_never_writes_into_its_input(llama_folder):
    before = sorted(p.name for p in llama_folder.iterdir())
    line = one_line_error(run_cli("rewire", llama_folder, "-o", llama_folder / "adapter"))
    assert "never writes into its input" in line
    assert sorted(p.name for p in llama_folder.iterdir()) == before


def test_rewire_refuses_hyper_on_gpt2_with_cross_attention(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, add_cross_attention=True)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "g")
    line = one_line_error(run_cli("rewire", tmp_path / "g", "--kind", "hyper",
                                  "-o", tmp_path / "o"))
    assert "crossattention" in line
