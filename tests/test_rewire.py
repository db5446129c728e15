"""rewire: DWA and hyper-connections on models that have a residual stream, exact at insertion.

Exact means torch.equal: every new weight is 0 or 1 at insertion, 1*y and 0*y are exact, and
the streams are added in the order the block added them (see rewire/hyper.py). mHC is the one
kind that is not exact; it is held to ``MHC_BOUND`` relative to the output's scale.
"""

import pytest
import torch

from ressurgeon import RewireConfig, load_adapter, rewire, unwrap
from ressurgeon.config import REWIRE_KINDS
from ressurgeon.errors import ConfigError, LoadError
from ressurgeon.rewire import KINDS, MHC_BOUND, RewiredBlock
from ressurgeon.rewire.base import StreamState

from tests.models import PreNormTransformer, tiny_gpt2_lm, tiny_llama_lm

VOCAB = 64


def _prenorm():
    torch.manual_seed(0)
    return PreNormTransformer(vocab=VOCAB, dim=32, heads=4, depth=4)


def _llama():
    pytest.importorskip("transformers")
    return tiny_llama_lm()


def _gpt2():
    pytest.importorskip("transformers")
    return tiny_gpt2_lm()


MODELS = {"prenorm": _prenorm, "llama": _llama, "gpt2": _gpt2}
HF = ("llama", "gpt2")
CONFIGS = {
    "dwa": RewireConfig(kind="dwa"),
    "dwa-2x2": RewireConfig(kind="dwa", dilation=2, period=2),
    "hyper-4": RewireConfig(kind="hyper", n=4),
    "hyper-3-dynamic": RewireConfig(kind="hyper", n=3, dynamic=True),
}


def _ids(batch=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, **kw):
    out = model(ids, **kw) if not hasattr(model, "config") else model(ids, use_cache=False, **kw)
    return out.logits if hasattr(out, "logits") else out


def _build(name, dtype=torch.float32):
    return MODELS[name]().to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_exact_at_insertion_at_every_size(name, config, dtype):
    model = _build(name, dtype)
    result = rewire(model, (_ids(),), config)
    assert result.parity.max_abs_diff == 0.0
    assert type(result.module) is type(model)
    assert len(result.blocks) == 4
    with torch.no_grad():
        for batch, length in [(2, 9), (1, 1), (3, 5), (4, 23)]:
            ids = _ids(batch, length, seed=batch + length)
            assert torch.equal(_run(result.module, ids), _run(model, ids))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_perturbing_one_new_weight_changes_the_output(name, config):
    """The negative control: the new parameters are wired in."""
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    name_, param = [(k, p) for k, p in result.new_parameters().items()   # the last block's
                    if k.endswith(("weights", "static_beta"))][-1]
    with torch.no_grad():
        param.add_(0.5)
        assert not torch.equal(_run(result.module, _ids()), _run(model, _ids())), name_


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_new_parameter_and_a_step_moves_them(name, config):
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    module = result.module.train()
    new = result.new_parameters()
    before = {k: p.detach().clone() for k, p in new.items()}
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)   # moves any non-zero gradient
    for _ in range(2):   # the dynamic scales multiply tanh(0) = 0: their gradient starts at 0
        opt.zero_grad()
        _run(module, _ids()).float().pow(2).mean().backward()
        for k, p in new.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), k
            if not k.endswith("_scale"):
                assert p.grad.abs().sum() > 0, k
        opt.step()
    assert [k for k, p in new.items() if torch.equal(before[k], p.detach())] == []


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_the_input_model_is_untouched(name, config):
    model = _build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    result = rewire(model, (_ids(),), config)
    assert result.module is not model
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, RewiredBlock) for m in model.modules())


def test_inplace_rewires_the_model_passed_in():
    model = _build("prenorm")
    want = _run(model, _ids())
    result = rewire(model, (_ids(),), RewireConfig(kind="hyper", inplace=True))
    assert result.module is model and isinstance(model.blocks[0], RewiredBlock)
    assert torch.equal(_run(model, _ids()), want)


@pytest.mark.parametrize("config", [CONFIGS["dwa"], CONFIGS["hyper-3-dynamic"]], ids=["dwa", "hyper"])
@pytest.mark.parametrize("name", HF)
def test_generate_with_the_kv_cache_gives_the_same_tokens(name, config):
    model = _build(name)
    model.config.use_cache = True
    result = rewire(model, (_ids(),), config)
    prompt = _ids(2, 6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **kw)
    got = result.module.generate(prompt, **kw)
    assert torch.equal(got, want)
    assert got.shape == (2, 12)


@pytest.mark.parametrize("config", [CONFIGS["dwa"], CONFIGS["hyper-4"]], ids=["dwa", "hyper"])
@pytest.mark.parametrize("name", HF)
def test_output_hidden_states_match_the_original_at_insertion(name, config):
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    with torch.no_grad():
        want = model(_ids(), use_cache=False, output_hidden_states=True).hidden_states
        got = result.module(_ids(), use_cache=False, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 5
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("config", [CONFIGS["dwa"], CONFIGS["hyper-4"]], ids=["dwa", "hyper"])
@pytest.mark.parametrize("name", HF)
def test_gradient_checkpointing_gives_the_same_gradients_and_no_state_outlives_a_forward(
        name, config):
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    with torch.no_grad():   # trained-like wiring, so the streams differ
        for p in result.new_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    grads = []
    for checkpointing in (False, True):
        module = result.module
        if checkpointing:
            module.activation_checkpointing_enable()
        module.train().zero_grad()
        torch.manual_seed(0)   # GPT-2's dropout draws the same masks in both runs
        _run(module, _ids()).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in result.new_parameters().items()})
        assert result.wrappers[0]._state.values == {}
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_mhc_is_within_its_stated_bound(name, dynamic):
    model = _build(name)
    result = rewire(model, (_ids(),), RewireConfig(kind="hyper", mhc=True, dynamic=dynamic))
    assert not result.exact
    with torch.no_grad():
        want, got = _run(model, _ids(3, 11)), _run(result.module, _ids(3, 11))
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= MHC_BOUND[torch.float32] * scale
    mix = [m for m in result.module.modules() if hasattr(m, "residual_logits")][0]
    from ressurgeon.rewire.hyper import sinkhorn
    p = sinkhorn(mix.residual_logits)
    torch.testing.assert_close(p.sum(0), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(4), atol=1e-6, rtol=0)


def test_readout_of_equal_streams_is_exact_where_the_mean_is_not():
    from ressurgeon.rewire.hyper import readout

    h = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    streams = h.expand(3, -1)
    assert torch.equal(readout(streams), h)
    assert not torch.equal(streams.sum(0) / 3, h)   # why the read-out is not the mean


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", MODELS)
def test_adapter_round_trip_onto_a_fresh_base(name, config, tmp_path):
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    with torch.no_grad():
        for p in result.new_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    folder = result.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["rewire.safetensors",
                                                        "rewire_config.json"]
    fresh = _build(name)   # the same seed: the same base weights
    again = load_adapter(fresh, folder)
    assert not any(isinstance(m, RewiredBlock) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(_run(again, _ids()), _run(result.module, _ids()))


def test_adapter_refuses_another_model_and_another_format(tmp_path):
    result = rewire(_build("prenorm"), (_ids(),), CONFIGS["dwa"])
    folder = result.save_adapter(tmp_path / "a")
    with pytest.raises(ConfigError, match="blocks"):
        load_adapter(PreNormTransformer(vocab=VOCAB, dim=32, heads=4, depth=3), folder)
    (folder / "rewire_config.json").write_text('{"format": "peft"}')
    with pytest.raises(LoadError, match="not a ressurgeon rewire adapter"):
        load_adapter(_build("prenorm"), folder)


@pytest.mark.parametrize("config", [CONFIGS["dwa-2x2"], CONFIGS["hyper-3-dynamic"]],
                         ids=["dwa", "hyper"])
@pytest.mark.parametrize("name", MODELS)
def test_unwrap_gives_the_plain_model_back_at_init_and_refuses_after_training(name, config):
    model = _build(name)
    result = rewire(model, (_ids(),), config)
    plain = result.unwrap()
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(_run(plain, _ids()), _run(model, _ids()))
    assert len(result.still_at_init()) == 4
    with torch.no_grad():
        list(result.new_parameters().values())[0].add_(0.1)
    with pytest.raises(ConfigError, match="moved"):
        unwrap(result.module)


def test_hyper_refuses_a_post_norm_model_and_dwa_rewires_it_exactly():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).eval()
    with pytest.raises(ConfigError, match="post-norm"):
        rewire(bert, (_ids(),), RewireConfig(kind="hyper"))
    result = rewire(bert, (_ids(),), RewireConfig(kind="dwa"))
    assert result.parity.max_abs_diff == 0.0 and result.prefix == "encoder.layer"


def test_a_model_without_a_block_list_is_refused():
    with pytest.raises(ConfigError):
        rewire(torch.nn.Linear(4, 4), (torch.randn(2, 4),), RewireConfig())


def test_rewiring_twice_is_refused():
    result = rewire(_build("prenorm"), (_ids(),), CONFIGS["dwa"])
    with pytest.raises(ConfigError, match="rewired already"):
        rewire(result.module, (_ids(),), CONFIGS["hyper-4"])


def test_config_is_validated_and_the_kinds_table_matches_it():
    assert set(KINDS) == set(REWIRE_KINDS)
    for bad in (dict(kind="dense"), dict(kind="dwa", n=2), dict(kind="hyper", dilation=2),
                dict(kind="hyper", n=0), dict(kind="dwa", period=0),
                dict(kind="hyper", dynamic="yes")):
        with pytest.raises(ConfigError):
            RewireConfig(**bad)
    config = RewireConfig(kind="hyper", n=2, dynamic=True, mhc=True)
    assert RewireConfig.from_dict(config.to_dict()) == config


def test_report_counts_the_parameters_added():
    result = rewire(_build("prenorm"), (_ids(),), RewireConfig(kind="dwa"))
    # block i (1-based) averages i + 1 outputs: 2 + 3 + 4 + 5
    assert result.params_added == 14
    report = result.to_dict()
    assert report["blocks"] == [f"blocks.{i}" for i in range(4)]
    assert report["parity"]["max_abs_diff"] == 0.0 and report["exact"]
    hyper = rewire(_build("prenorm"), (_ids(),), RewireConfig(kind="hyper", n=4))
    # per sublayer: (n x (n+1)) + n; two sublayers per block, four blocks
    assert hyper.params_added == 4 * 2 * (4 * 5 + 4)


def test_a_deep_copy_of_a_rewired_model_gets_its_own_empty_state():
    import copy

    result = rewire(_build("prenorm"), (_ids(),), CONFIGS["hyper-4"])
    clone = copy.deepcopy(result.module)
    states = {id(b._state) for b in clone.blocks}
    assert len(states) == 1 and isinstance(clone.blocks[0]._state, StreamState)
    assert states != {id(result.module.blocks[0]._state)}
    assert torch.equal(_run(clone, _ids()), _run(result.module, _ids()))


def test_a_rewired_plain_model_exports_to_onnx(tmp_path):
    """Dynamic hyper-connections (the most involved kind; DWA exports too, 25 s a test)."""
    pytest.importorskip("onnxruntime")
    from ressurgeon import export_onnx

    result = rewire(_build("prenorm"), (_ids(),), CONFIGS["hyper-3-dynamic"])
    with torch.no_grad():   # trained-like wiring: the streams differ in the exported graph
        for p in result.new_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    report = export_onnx(result.module, tmp_path / "rewired.onnx", (_ids(),))
    assert report.exporter == "dynamo" and report.checker_passed
    assert set(report.parity) == {1, 2} and report.max_abs_diff <= 1e-5


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_mistral_and_qwen2_layers_take_the_llama_form(family):
    """Same layer layout as Llama in transformers 5: exact, and generate() unchanged."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    result = rewire(model, (_ids(),), RewireConfig(kind="hyper", n=2, dynamic=True))
    assert result.parity.max_abs_diff == 0.0
    assert [r["form"] for r in result.block_records()] == ["llama", "llama"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(result.module.generate(_ids(2, 5), **kw), model.generate(_ids(2, 5), **kw))
