"""Hugging Face transformers models: captured without a KV cache, shortcuts where the
architecture allows them, sequence lengths, ONNX, and save_pretrained folders.

Every model is a tiny random config built here (2 layers, hidden 32, vocab 100):
nothing is downloaded.
"""

import copy
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import one_line_error, run_cli
from ressurgeon import (LoadError, Reason, ShapeError, TraceError, TraceOptions, UnsafeFileError,
                        add_skips, export_onnx, load_model)
from ressurgeon.verify import eval_outputs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # tiny configs make transformers warn about them

VOCAB, HIDDEN, LAYERS = 100, 32, 2
ROOT = Path(__file__).resolve().parents[1]


def _bert(cls=None):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                     num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return (cls or transformers.BertModel)(config)


def _gpt2(cls=None):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                                     n_positions=64, bos_token_id=1, eos_token_id=2)
    return (cls or transformers.GPT2Model)(config)


def _llama():
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


def _t5():
    return transformers.T5Model(transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2))


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, image_size=32, patch_size=8))


def _mobilenet_v1():
    # A plain stack of depthwise-separable convolutions: no residuals of its own. With the
    # default init (std 0.02) its outputs fade to 1e-33 over 27 convolutions, and any
    # comparison would pass; std 0.3 keeps them near 1.
    return transformers.MobileNetV1Model(transformers.MobileNetV1Config(
        image_size=32, depth_multiplier=0.25, min_depth=4, initializer_range=0.3))


def _ids(batch=2, length=8):
    return torch.randint(0, VOCAB, (batch, length))


# name -> (builder, example inputs, residual connections the model has).
# Every transformer block has two residual sums (attention, MLP); a T5 decoder block three
# (self-attention, cross-attention, MLP).
FAMILIES = {
    "bert": (_bert, lambda: (_ids(),), 2 * LAYERS),
    "gpt2": (_gpt2, lambda: (_ids(),), 2 * LAYERS),
    "llama": (_llama, lambda: (_ids(),), 2 * LAYERS),
    # forward(input_ids, attention_mask, decoder_input_ids): a real mask, a shorter target
    "t5": (_t5, lambda: (_ids(), torch.ones(2, 8, dtype=torch.long), _ids(length=5)),
           2 * LAYERS + 3 * LAYERS),
    "vit": (_vit, lambda: (torch.randn(2, 3, 32, 32),), 2 * LAYERS),
    "mobilenet_v1": (_mobilenet_v1, lambda: (torch.randn(2, 3, 32, 32),), 0),
}
TRANSFORMERS = ("bert", "gpt2", "llama", "t5", "vit")


@pytest.fixture(scope="module")
def surgery():
    """name -> (model, inputs, add_skips result), each computed once for the module."""
    done = {}

    def get(name):
        if name not in done:
            torch.manual_seed(0)
            build, inputs, _ = FAMILIES[name]
            model, x = build().eval(), inputs()
            done[name] = model, x, add_skips(model, x)
        return done[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_surgery_computes_what_the_original_does(surgery, name):
    model, x, result = surgery(name)
    # torch.fx cannot trace transformers' forward decorators: every family goes through
    # torch.export, and the cache-free capture is what lets GPT-2, Llama and T5 through.
    assert result.method == "export"
    # init preserve: the rewritten model's outputs equal the original's within the rewrite
    # tolerance (1e-6 for float32); with no shortcut it is the captured graph, exact.
    assert result.parity.ok, result.parity.describe()
    # at least every block's sums (transformers 5.0's T5 also adds its position bias to the
    # attention scores in a way that reads as one more residual per attention)
    assert len(result.residuals) >= FAMILIES[name][2]
    assert bool(result.residuals) == (name in TRANSFORMERS)
    expected = eval_outputs(model, x, {"use_cache": False} if name in ("gpt2", "llama", "t5")
                            else {})
    got = eval_outputs(result.module, x)
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_blocks_are_already_residual(surgery, name):
    """Every candidate span of a transformer lies inside or beside a residual it already has
    (or ends at the output), so none is chosen: the reasons say so."""
    _, _, result = surgery(name)
    reasons = {s.reason for s in result.spans if not s.chosen}
    assert not result.skips
    assert Reason.EXISTING in reasons and reasons <= {Reason.EXISTING, Reason.HEAD}


def test_a_plain_hf_model_gets_shortcuts_and_they_are_wired_in(surgery):
    model, x, result = surgery("mobilenet_v1")
    assert result.skips and not result.residuals
    # negative control: opening the gates changes the outputs, so the shortcuts are in the graph
    opened = copy.deepcopy(result.module)
    with torch.no_grad():
        for name, p in opened.named_parameters():
            if name.endswith(".gate"):
                p.fill_(1.0)
    assert not torch.allclose(eval_outputs(opened, x)[0], eval_outputs(model, x)[0])


def test_the_users_model_keeps_its_cache_setting(surgery):
    model, x, _ = surgery("gpt2")
    assert model.config.use_cache is True
    assert model(*x).past_key_values is not None  # it still caches when called directly


def test_a_returned_cache_names_use_cache_false():
    class Generating(torch.nn.Module):  # asks for the cache itself, whatever the config says
        def __init__(self):
            super().__init__()
            self.lm = _gpt2()

        def forward(self, ids):
            out = self.lm(ids, use_cache=True)
            return out.last_hidden_state, out.past_key_values

    with pytest.raises(TraceError, match=r"DynamicCache.*pass use_cache=False") as caught:
        add_skips(Generating().eval(), (_ids(),))
    assert "torch.cond" not in str(caught.value)  # not the control-flow advice


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_a_dynamic_sequence_dim_computes_every_length(surgery, name):
    model, x, fixed = surgery(name)
    dynamic = add_skips(model, x, trace=TraceOptions(dynamic=(1,))).module
    kwargs = {"use_cache": False} if name == "gpt2" else {}
    for length in (3, 8, 21):
        other = (_ids(batch=3, length=length),)
        for want, have in zip(eval_outputs(model, other, kwargs), eval_outputs(dynamic, other)):
            torch.testing.assert_close(have, want, rtol=0, atol=1e-5)
    # without it the capture computes the example's length only, and refuses any other
    with pytest.raises(ShapeError, match="size 9 at dim 1.*size 8 there"):
        fixed.module(_ids(length=9))


# ONNX, one family per kind of graph (a token transformer, a plain CNN with shortcuts); each
# export costs seconds. BERT, Llama and ViT export as these do (checked by hand: dynamo
# exporter, batches 2 and 1 within 2e-6).
@pytest.mark.parametrize("name", ["gpt2", "mobilenet_v1"])
def test_onnx_matches_pytorch_at_two_batch_sizes(surgery, name, tmp_path):
    pytest.importorskip("onnxruntime")
    _, x, result = surgery(name)
    report = export_onnx(result.module, tmp_path / f"{name}.onnx", x)
    assert report.exporter == "dynamo" and report.dynamic_batch
    assert sorted(report.parity) == [1, 2]
    assert report.max_abs_diff <= report.tolerance


def test_t5_exports_to_onnx_with_a_static_batch(surgery, tmp_path):
    """torch 2.13's dynamo exporter cannot decompose T5's attention reshape, so the TorchScript
    exporter writes it, with the example's sizes: a dynamic batch fails at the second batch
    size (the error says --static-batch; about 10 s, checked by hand); a static one passes."""
    pytest.importorskip("onnxruntime")
    _, x, result = surgery("t5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning, while torch cannot do better
        report = export_onnx(result.module, tmp_path / "t5.onnx", x, dynamic_batch=False)
    assert list(report.parity) == [2] and report.max_abs_diff <= report.tolerance


class _ReturnsModelOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=self.linear(x))


def test_a_pt2_returning_a_model_output_names_the_type_not_corruption(tmp_path):
    path = tmp_path / "raw.pt2"
    x = torch.randn(2, 4)
    torch.export.save(torch.export.export(_ReturnsModelOutput(), (x,)), path)
    # here transformers registered the type: the archive loads, its outputs a plain dict
    assert set(load_model(path)(x)) == {"last_hidden_state"}
    # a fresh process without transformers imported cannot rebuild that type
    done = subprocess.run([sys.executable, "-m", "ressurgeon", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no traceback
    assert "transformers.modeling_outputs.BaseModelOutput" in done.stderr
    assert "import transformers.modeling_outputs" in done.stderr
    assert "corrupted" not in done.stderr


# -- save_pretrained folders ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = _bert(transformers.BertForMaskedLM).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(folder)
    return model, folder


def test_a_folder_loads_in_eval_mode_with_its_weights(bert_folder):
    model, folder = bert_folder
    loaded = load_model(folder)
    assert type(loaded) is type(model) and not loaded.training
    x = _ids()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_cli_add_skips_on_a_folder_writes_a_pt2_that_matches(bert_folder, tmp_path):
    model, folder = bert_folder
    out = tmp_path / "bert.skips.pt2"
    result = run_cli("add-skips", folder, "-i", "2,8:int64", "--span", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # the one span of BERT outside its residual blocks: the MLM head's dense+LayerNorm
    [skip] = report["skips"]
    assert skip["kind"] == "identity" and "cls.predictions.transform" in json.dumps(skip)
    assert report["parity"]["max_abs_diff"] == 0.0
    rewritten = load_model(out).eval()  # from a plain .pt2: no transformers type in it
    x = _ids()
    with torch.no_grad():
        assert torch.equal(rewritten(x)["logits"], model(x).logits)


def test_cli_takes_default_inputs_from_the_config(bert_folder):
    _, folder = bert_folder
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spans"][0]["src_shape"][:2] == [1, 16]  # 1, min(16, 64)


def test_a_sharded_gpt2_folder_loads(tmp_path):
    model = _gpt2(transformers.GPT2LMHeadModel).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = _ids()
    assert torch.equal(load_model(tmp_path)(x).logits, model(x).logits)


def _folder_with(bert_folder, tmp_path, edit):
    _, folder = bert_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def test_pickled_weights_only_load_with_trust_pickle(bert_folder, tmp_path):
    def to_bin(folder):
        model = load_model(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()

    folder = _folder_with(bert_folder, tmp_path, to_bin)
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin, a pickle"):
        load_model(folder)
    assert "--trust-pickle" in one_line_error(run_cli("inspect", folder))
    assert load_model(folder, trust_pickle=True)(_ids()).logits.shape == (2, 8, VOCAB)


def test_remote_code_configs_are_refused(bert_folder, tmp_path):
    def add_auto_map(folder):
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_evil.py").write_text("raise SystemExit('ran code from the folder')\n")

    folder = _folder_with(bert_folder, tmp_path, add_auto_map)
    with pytest.raises(LoadError, match="auto_map.*trust_remote_code"):
        load_model(folder, trust_pickle=True)  # not even with the pickle flag
    assert "auto_map" in one_line_error(run_cli("add-skips", folder, "-o", tmp_path / "o.pt2"))
