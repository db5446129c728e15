"""Block expansion of safetensors checkpoints on disk (ressurgeon.deepen.stream).

The point is exactness: a checkpoint expanded with identity blocks, loaded by a model of
the new depth, computes exactly what the original did. The files are read back with
safetensors' own reader, so the hand-written format is checked against the reference.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models import tiny_llama_lm
from ressurgeon.deepen import stream
from ressurgeon.deepen import ZERO_RULES, expand_checkpoint
from ressurgeon.errors import ConfigError, ExportError, LoadError

REPO = Path(__file__).resolve().parents[1]


# -- a tiny pre-norm decoder with Llama's names, in plain torch ---------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d)   # with a bias: the bias must be zeroed too

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.self_attn, self.mlp = Attention(d), MLP(d, f)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyDecoder(nn.Module):
    def __init__(self, layers, vocab=50, d=16, f=32):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d, f) for _ in range(layers))
        self.model.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(self.model.norm(x))


def save_sharded(state, folder, config=None, shards=2, extra=True):
    """``state`` as an HF-style sharded checkpoint: shards, index, config.json, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]   # interleaved: layers span shards
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in group}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if extra:
        (folder / "tokenizer.json").write_text('{"model": "tiny"}')
        (folder / "generation_config.json").write_text('{"max_length": 20}')
    return folder


def load_checkpoint(folder):
    """All tensors of a checkpoint folder, through safetensors' reader and the index."""
    index = folder / "model.safetensors.index.json"
    files = (set(json.loads(index.read_text())["weight_map"].values()) if index.exists()
             else {"model.safetensors"})
    state = {}
    for file in sorted(files):
        state.update(load_file(folder / file))
    return state


def tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


LLAMA_CONFIG = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 16,
                "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    model = TinyDecoder(4)
    return save_sharded(model.state_dict(), tmp_path / "tiny", LLAMA_CONFIG), model


# -- exactness ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expanded_model_computes_exactly_what_the_original_did(tmp_path, dtype):
    torch.manual_seed(0)
    original = TinyDecoder(4).to(dtype)
    src = save_sharded(original.state_dict(), tmp_path / "src", LLAMA_CONFIG)
    report = expand_checkpoint(src, tmp_path / "dst", blocks=2, max_shard_bytes=20_000)

    assert (report.layers_before, report.layers_after) == (4, 6)
    assert report.new_layers == (2, 5) and report.copied_from == (1, 3)
    assert report.zero_rules == ("llama", "llama") and report.prefix == "model.layers"
    assert len(report.shards) > 1   # the cap split the output; an index ties it together
    deeper = TinyDecoder(6).to(dtype)
    deeper.load_state_dict(load_checkpoint(tmp_path / "dst"), strict=True)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want, got = original(ids), deeper(ids)
    assert (got - want).abs().max().item() == 0

    # negative control: the new blocks are wired in; a non-zero output projection shows
    with torch.no_grad():
        deeper.model.layers[2].self_attn.o_proj.bias.fill_(0.5)
        assert (deeper(ids) - want).abs().max().item() > 0
        deeper.model.layers[2].self_attn.o_proj.bias.zero_()


def test_zeroed_weights_still_get_a_gradient(llama_dir, tmp_path):
    src, _ = llama_dir
    report = expand_checkpoint(src, tmp_path / "dst", insert_after=[1])
    deeper = TinyDecoder(5)
    deeper.load_state_dict(load_checkpoint(tmp_path / "dst"), strict=True)
    F.cross_entropy(deeper(torch.randint(0, 50, (2, 6))).flatten(0, 1),
                    torch.randint(0, 50, (12,))).backward()
    params = dict(deeper.named_parameters())
    assert sorted(report.zeroed) == sorted(
        f"model.layers.2.{m}.{p}" for m in ("self_attn.o_proj", "mlp.down_proj")
        for p in ("weight", "bias"))
    for name in report.zeroed:
        assert params[name].abs().max() == 0
        assert params[name].grad.abs().max() > 0, name


@pytest.mark.parametrize("option, new, copied", [
    ({"insert_after": [0, 0, 3]}, (1, 2, 6), (0, 0, 3)),
    ({"every": 2}, (2, 5), (1, 3)),
    ({"blocks": 3}, (1, 3, 6), (0, 1, 3)),    # 4 layers, 3 blocks: after floor(4j/3) - 1
])
def test_copies_sit_after_their_source_and_later_layers_are_renumbered(llama_dir, tmp_path,
                                                                        option, new, copied):
    src, model = llama_dir
    report = expand_checkpoint(src, tmp_path / "dst", **option)
    assert (report.new_layers, report.copied_from) == (new, copied)
    state, old = load_checkpoint(tmp_path / "dst"), model.state_dict()
    sources = list(range(4))
    for index, src_layer in zip(new, copied, strict=True):
        sources.insert(index, src_layer)
    assert len(sources) == report.layers_after
    for index, src_layer in enumerate(sources):
        q = "self_attn.q_proj.weight"
        assert torch.equal(state[f"model.layers.{index}.{q}"], old[f"model.layers.{src_layer}.{q}"])
        zeroed = index in new
        o = state[f"model.layers.{index}.self_attn.o_proj.weight"]
        assert torch.equal(o, torch.zeros_like(o) if zeroed
                           else old[f"model.layers.{src_layer}.self_attn.o_proj.weight"])
    assert set(state) == {n for n in state if not n.startswith("model.layers.")} | {
        f"model.layers.{i}.{rest}" for i in range(len(sources))
        for rest in (n.split(".", 3)[3] for n in old if n.startswith("model.layers.0."))}


def test_config_and_other_files_follow_the_new_depth(llama_dir, tmp_path):
    src, _ = llama_dir
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "original").mkdir()
    report = expand_checkpoint(src, tmp_path / "dst", insert_after=[3])
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["hidden_size"] == 16
    assert config["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert report.config_keys == ("num_hidden_layers", "layer_types")
    assert report.files_copied == ("generation_config.json", "tokenizer.json")
    assert report.files_skipped == ("original/", "pytorch_model.bin")
    for name in report.files_copied:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "dst")) == sorted(
        [*report.shards, "config.json", *report.files_copied])   # fits one shard: no index
    assert report.bytes_written == sum(p.stat().st_size for p in (tmp_path / "dst").iterdir())
    assert json.loads(json.dumps(report.to_dict()))["new_layers"] == [4]


def test_nested_config_index_lists_and_schedules(tmp_path):
    state = {f"model.layers.{i}.{m}.weight": torch.randn(4, 4)
             for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj")}
    config = {"model_type": "llava", "vision_config": {"num_hidden_layers": 2},
              "text_config": {"num_hidden_layers": 4, "mlp_only_layers": [1, 3],
                              "eos_token_id": [1, 2, 3, 4], "decoder_sparse_step": 1}}
    src = save_sharded(state, tmp_path / "src", config)
    report = expand_checkpoint(src, tmp_path / "dst", insert_after=[1])
    new = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert new["text_config"]["num_hidden_layers"] == 5
    assert new["text_config"]["mlp_only_layers"] == [1, 2, 4]   # 1, its copy, and 3 moved on
    assert new["text_config"]["eos_token_id"] == [1, 2, 3, 4]   # not a per-layer list
    assert new["vision_config"] == {"num_hidden_layers": 2}
    assert report.config_keys == ("text_config.num_hidden_layers", "text_config.mlp_only_layers")

    config["text_config"]["decoder_sparse_step"] = 2   # every 2nd layer MoE: would shift
    src = save_sharded(state, tmp_path / "src2", config)
    with pytest.raises(ConfigError, match="decoder_sparse_step=2.*config=False"):
        expand_checkpoint(src, tmp_path / "dst2", insert_after=[1])
    report = expand_checkpoint(src, tmp_path / "dst3", insert_after=[1], config=False)
    assert report.config_keys == () and "config.json" in report.files_copied
    assert (tmp_path / "dst3" / "config.json").read_bytes() == (src / "config.json").read_bytes()


@pytest.mark.parametrize("extra, after, error", [
    ({"first_k_dense_replace": 1}, [1, 2], None),      # copies of MoE layers land among MoE ones
    ({"first_k_dense_replace": 2}, [1], "insert after layers 2 and later only"),
    ({"no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0]}, [3], None),   # listed
    ({"sliding_window_pattern": 2}, [0], "add layer_types to config.json first"),
    ({"max_window_layers": 2, "use_sliding_window": False}, [0], None),           # rule off
    ({"moe_layer_freq": 2}, [0], "cannot keep this"),
])
def test_rules_that_give_layers_a_kind_by_index(tmp_path, extra, after, error):
    state = {f"model.layers.{i}.{m}.weight": torch.randn(2, 2)
             for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj")}
    src = save_sharded(state, tmp_path / "src", {"num_hidden_layers": 4, **extra})
    if error:
        with pytest.raises(ConfigError, match=error):
            expand_checkpoint(src, tmp_path / "dst", insert_after=after)
        return
    expand_checkpoint(src, tmp_path / "dst", insert_after=after)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 + len(after)
    if "no_rope_layers" in extra:
        assert config["no_rope_layers"] == [1, 1, 1, 0, 0]


# -- architectures: detected, zeroed, or refused ------------------------------------------------

def gpt2_state(layers=3, d=8):
    state = {"transformer.wte.weight": torch.randn(20, d),
             "transformer.ln_f.weight": torch.ones(d)}
    for i in range(layers):
        p = f"transformer.h.{i}"
        state |= {f"{p}.ln_1.weight": torch.ones(d),
                  f"{p}.attn.c_attn.weight": torch.randn(d, 3 * d),
                  f"{p}.attn.c_proj.weight": torch.randn(d, d),
                  f"{p}.attn.c_proj.bias": torch.randn(d),
                  f"{p}.mlp.c_fc.weight": torch.randn(d, 4 * d),
                  f"{p}.mlp.c_proj.weight": torch.randn(4 * d, d),
                  f"{p}.mlp.c_proj.bias": torch.randn(d),
                  # a buffer in another dtype: the output must keep it and stay aligned
                  f"{p}.attn.bias": torch.tril(torch.ones(1, 1, 4, 4, dtype=torch.bool))}
    return state


def test_gpt2_names_are_detected_and_every_byte_survives(tmp_path):
    torch.manual_seed(0)
    state = gpt2_state()
    state["transformer.wpe.weight"] = torch.randn(7, 8).to(torch.bfloat16)
    state["transformer.h.0.mlp.step"] = torch.tensor([3], dtype=torch.int64)
    state["transformer.h.1.mlp.step"] = torch.tensor([4], dtype=torch.int64)
    state["transformer.h.2.mlp.step"] = torch.tensor([5], dtype=torch.int64)
    src = save_sharded(state, tmp_path / "src", {"model_type": "gpt2", "n_layer": 3}, shards=3)
    report = expand_checkpoint(src, tmp_path / "dst", every=3)
    assert report.prefix == "transformer.h" and report.zero_rules == ("gpt2",)
    assert set(report.zeroed) == {f"transformer.h.3.{m}.{p}" for m in ("attn.c_proj", "mlp.c_proj")
                                  for p in ("weight", "bias")}
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["n_layer"] == 4
    out = load_checkpoint(tmp_path / "dst")
    for name, tensor in out.items():
        old = name.replace("transformer.h.3.", "transformer.h.2.")
        want = torch.zeros_like(tensor) if name in report.zeroed else state[old]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    assert len(out) == len(state) + 9


@pytest.mark.parametrize("config", [{"model_type": "bert", "num_hidden_layers": 2}, None])
def test_post_norm_blocks_are_refused(tmp_path, config):
    state = {}
    for i in range(2):
        p = f"bert.encoder.layer.{i}"
        for m in ("attention.self.query", "attention.output.dense", "attention.output.LayerNorm",
                  "intermediate.dense", "output.dense", "output.LayerNorm"):
            state[f"{p}.{m}.weight"] = torch.randn(4, 4)
    src = save_sharded(state, tmp_path / "src", config)
    with pytest.raises(ConfigError, match="needs pre-norm residual blocks"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["output.dense"])
    assert not (tmp_path / "dst").exists()


def unknown_state():
    return {f"net.blocks.{i}.{m}.{p}": torch.randn(4, 4) if p == "weight" else torch.randn(4)
            for i in range(3) for m in ("mix", "proj") for p in ("weight", "bias")}


def test_unknown_blocks_are_refused_until_zero_names_their_outputs(tmp_path):
    src = save_sharded(unknown_state(), tmp_path / "src")
    with pytest.raises(ConfigError, match=r"no rule .* \(mix.bias, mix.weight, proj.bias, "
                                          r"proj.weight\); pass zero=\["):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)
    with pytest.raises(ConfigError, match="leaves the bias.*zero=\\['proj'"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["proj.weight"])
    with pytest.raises(ConfigError, match="'nothing' matches no tensor"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["proj", "nothing"])
    assert not (tmp_path / "dst").exists()
    report = expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["proj"])
    assert report.zero_rules == ("zero=[...]",) and report.new_layers == (3,)
    assert set(report.zeroed) == {"net.blocks.3.proj.weight", "net.blocks.3.proj.bias"}
    assert report.config_keys == ()   # no config.json: nothing to update


def test_auto_refuses_a_block_its_rule_does_not_fully_cover(tmp_path):
    # DeepSeek-style shared experts are a third branch; a rule that misses them is not identity
    state = {f"model.layers.{i}.{m}.weight": torch.randn(2, 2) for i in range(2)
             for m in ("self_attn.o_proj", "mlp.experts.0.down_proj", "mlp.experts.1.down_proj",
                       "mlp.shared_experts.down_proj", "mlp.shared.down_proj")}
    src = save_sharded(state, tmp_path / "src")
    with pytest.raises(ConfigError, match="rule 'deepseek-moe' leaves mlp.shared.down_proj"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)
    assert "qwen2-moe" in ZERO_RULES   # the table is the one place a family is added
    with pytest.raises(ConfigError, match=r"zero=\['o_proj', 'experts.\*.down_proj'\] leaves "
                                          "mlp.shared.down_proj"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["o_proj", "experts.*.down_proj"])
    report = expand_checkpoint(src, tmp_path / "dst", blocks=1, zero=["o_proj", "down_proj"])
    assert len(report.zeroed) == 5


def test_quantized_outputs_are_not_zeroed(tmp_path):
    state = {f"model.layers.{i}.{m}": torch.randn(2, 2)
             for i in range(2) for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight")}
    state |= {f"model.layers.{i}.mlp.down_proj.weight_scale": torch.ones(1) for i in range(2)}
    src = save_sharded(state, tmp_path / "src")
    with pytest.raises(ConfigError, match="cannot zero model.layers.1.mlp.down_proj.weight_scale"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)


def test_stack_detection_prefers_the_config_and_refuses_a_tie(tmp_path):
    state = {f"{stack}.{i}.{m}.weight": torch.randn(2, 2) for stack, n in
             (("model.layers", 3), ("vision.blocks", 3)) for i in range(n)
             for m in ("self_attn.o_proj", "mlp.down_proj")}
    src = save_sharded(state, tmp_path / "src")
    with pytest.raises(ConfigError, match="several layer stacks have 3 layers .*prefix="):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)
    report = expand_checkpoint(src, tmp_path / "dst", blocks=1, prefix="vision.blocks")
    assert report.prefix == "vision.blocks" and report.layers_after == 4


# -- files: what is refused, and nothing half-written -------------------------------------------

@pytest.mark.parametrize("kwargs, error", [
    ({}, "exactly one of"),
    ({"blocks": 2, "every": 2}, "exactly one of"),
    ({"blocks": 0}, "positive whole number"),
    ({"blocks": 9}, "more than the 4 layers"),
    ({"insert_after": [4]}, "from 0 to 3"),
    ({"blocks": 1, "zero": "self_attn.o_proj"}, "list of names"),
])
def test_bad_options_are_refused_before_any_work(llama_dir, tmp_path, kwargs, error):
    src, _ = llama_dir
    with pytest.raises(ConfigError, match=error):
        expand_checkpoint(src, tmp_path / "dst", **kwargs)
    assert not (tmp_path / "dst").exists()


def test_destination_must_be_new_or_empty_and_outside_the_source(llama_dir, tmp_path):
    src, _ = llama_dir
    before = tree_digest(src)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for dst, error in ((full, "not empty"), (src, "inside the source"),
                       (src / "sub", "inside the source"),
                       (tmp_path / "a" / "b", "does not exist")):
        with pytest.raises(ExportError, match=error):
            expand_checkpoint(src, dst, blocks=1)
    assert list(full.iterdir()) == [full / "notes.txt"]
    assert (full / "notes.txt").read_text() == "mine"
    assert tree_digest(src) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    expand_checkpoint(src, empty, blocks=1)
    assert "config.json" in os.listdir(empty)


def test_a_failure_midway_leaves_nothing_behind(llama_dir, tmp_path, monkeypatch):
    src, _ = llama_dir
    before = tree_digest(src)

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "_write_index", broken)
    with pytest.raises(ExportError, match="No space left on device; nothing was written"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1, max_shard_bytes=10_000)
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if "ressurgeon-tmp" in p.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError):
        expand_checkpoint(src, empty, blocks=1, max_shard_bytes=10_000)
    assert list(empty.iterdir()) == []
    assert tree_digest(src) == before


def test_damaged_checkpoints_are_refused(llama_dir, tmp_path):
    src, _ = llama_dir
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(LoadError, match="00002.*not a valid safetensors file"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)
    shard.unlink()
    with pytest.raises(LoadError, match="not a file in"):
        expand_checkpoint(src, tmp_path / "dst", blocks=1)
    (tmp_path / "bare").mkdir()
    with pytest.raises(LoadError, match="no .safetensors files"):
        expand_checkpoint(tmp_path / "bare", tmp_path / "dst", blocks=1)


# -- memory: peak resident set near one tensor, not one shard -----------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch, safetensors.torch
    from ressurgeon.deepen import expand_checkpoint

    def peak_kb():   # the high-water mark since the last reset (Linux), else since start
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    folder = Path(sys.argv[1])
    reset(); hwm = peak_kb(); start = time.perf_counter()
    report = expand_checkpoint(folder / "src", folder / "dst", blocks=2,
                               max_shard_bytes=64 << 20)
    seconds = time.perf_counter() - start
    grown = {"hwm_mb": (peak_kb() - hwm) / 1024, "seconds": seconds,
             "written_mb": report.bytes_written / 2**20}
    # the meter sees a whole shard loaded (safetensors maps it; summing touches every page)
    reset(); hwm = peak_kb()
    sum(t.sum().item() for t in safetensors.torch.load_file(folder / "src" / sys.argv[2]).values())
    grown["control_mb"] = (peak_kb() - hwm) / 1024
    print(json.dumps(grown))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_grows_by_at_most_two_tensors(tmp_path):
    # Measured: 7.9 MB (one 8 MB copy buffer). The bound stays well under one 64 MB shard, so
    # reading a whole shard at once fails it. (ru_maxrss is not used: it is the process's
    # lifetime peak, set by importing torch, and grows by 0 here whatever expand does.)
    tensor_mb, overhead_mb = 8, 8   # overhead: headers, the plan, Python's allocator
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    names = [f"model.layers.{i}.{m}.weight" for i in range(6)
             for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    weight_map = {}
    for s in range(3):   # 3 shards of 8 tensors of 8 MB: 192 MB, 24x the largest tensor
        file = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({n: torch.randn(1024, 2048) for n in names[8 * s:8 * s + 8]}, src / file)
        weight_map.update(dict.fromkeys(names[8 * s:8 * s + 8], file))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path),
                           "model-00001-of-00003.safetensors"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout)
    print(grown)
    assert grown["written_mb"] > 250                   # 8 layers of 4 tensors were written
    assert grown["control_mb"] > 60                    # the meter does see a 64 MB shard load
    bound = 2 * tensor_mb + overhead_mb
    assert 1 < grown["hwm_mb"] <= bound < 64, grown   # the meter sees the copy buffer


# -- with transformers, if installed --------------------------------------------------------------

def test_transformers_llama_expanded_matches_logits_and_generation(tmp_path):
    transformers = pytest.importorskip("transformers")
    original = tiny_llama_lm().eval()
    original.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    report = expand_checkpoint(tmp_path / "src", tmp_path / "dst", blocks=2,
                               max_shard_bytes=100_000)   # transformers reads our index
    assert len(report.shards) > 1
    deeper, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dst", output_loading_info=True)
    deeper.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert deeper.config.num_hidden_layers == 6 == report.layers_after
    assert [layer.self_attn.layer_idx for layer in deeper.model.layers] == list(range(6))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(deeper(ids).logits, original(ids).logits)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        assert torch.equal(deeper.generate(ids, **kwargs), original.generate(ids, **kwargs))


# family -> (config class, kwargs, the ZERO_RULES rule each copy uses); tiny random models
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4}
FAMILIES = {
    "gpt2": ("GPT2Config", {"vocab_size": 64, "n_embd": 32, "n_layer": 4, "n_head": 4},
             ("gpt2", "gpt2")),
    "gptj": ("GPTJConfig", {"vocab_size": 64, "n_embd": 32, "n_layer": 4, "n_head": 4,
                            "rotary_dim": 4}, ("gpt-j", "gpt-j")),
    "gpt_neox": ("GPTNeoXConfig", SMALL, ("gpt-neox", "gpt-neox")),
    "falcon": ("FalconConfig", {**SMALL, "intermediate_size": None}, ("falcon", "falcon")),
    "phi": ("PhiConfig", SMALL, ("phi", "phi")),
    "opt": ("OPTConfig", {"vocab_size": 64, "hidden_size": 32, "ffn_dim": 64,
                          "num_hidden_layers": 4, "num_attention_heads": 4,
                          "word_embed_proj_dim": 32}, ("opt", "opt")),
    "gemma3": ("Gemma3TextConfig", {**SMALL, "num_key_value_heads": 2, "head_dim": 8,
                                    "sliding_window": 4}, ("llama", "llama")),
    "mixtral": ("MixtralConfig", {**SMALL, "num_key_value_heads": 2, "num_local_experts": 4},
                ("mixtral", "mixtral")),
    "qwen3_moe": ("Qwen3MoeConfig", {**SMALL, "num_key_value_heads": 2, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                     "mlp_only_layers": [1]}, ("llama", "qwen-moe")),
    "qwen2_moe": ("Qwen2MoeConfig", {**SMALL, "num_key_value_heads": 2, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                     "shared_expert_intermediate_size": 16},
                  ("qwen2-moe", "qwen2-moe")),
    "deepseek_v3": ("DeepseekV3Config", {**SMALL, "num_key_value_heads": 4,
                                         "n_routed_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 16, "n_shared_experts": 1,
                                         "first_k_dense_replace": 1, "q_lora_rank": 16,
                                         "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                                         "qk_nope_head_dim": 4, "v_head_dim": 8, "n_group": 1,
                                         "topk_group": 1}, ("deepseek-moe", "deepseek-moe")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_families_expand_exactly(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    name, kwargs, rules = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, name)(**{k: v for k, v in kwargs.items() if v is not None})
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    original.save_pretrained(tmp_path / "src")
    report = expand_checkpoint(tmp_path / "src", tmp_path / "dst", insert_after=[1, 2])
    assert report.zero_rules == rules
    deeper, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(deeper.eval()(ids).logits, original(ids).logits)
