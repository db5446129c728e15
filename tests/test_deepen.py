"""deepen: new residual blocks that start as exactly the identity (ressurgeon.deepen).

The point is exactness: at insertion the deeper model computes bit for bit what the original
did (a zero weight contributes exactly 0 in IEEE arithmetic, and ``x + 0 == x``), while the
zeroed weights still get a gradient. Negative controls prove each new block is wired in.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import with_gates
from models import (ConvNeXtLike, ResidualMLP, ResNetLike, ViTLike, deep_mlp, plain_cnn,
                    randomize_bn, tiny_llama_lm)
from ressurgeon import (ConfigError, DeepenConfig, PlanError, Shortcut, SkipConfig, add_skips,
                        deepen, find_shortcuts, fold, load_model, save_model)
from ressurgeon.deepen import DeepenPlan, PlannedBlock, ResidualLayer
from ressurgeon.training import freeze_except, param_groups


def vit(depth=4):
    return ViTLike(depth=depth).eval(), (torch.randn(2, 3, 16, 16),)


def resnet():
    return randomize_bn(ResNetLike()).eval(), (torch.randn(2, 3, 8, 8),)


def convnext():
    return ConvNeXtLike().eval(), (torch.randn(2, 3, 16, 16),)


def skipped_mlp():
    """A plain MLP after add_skips with trained-looking (non-zero) gates: its spans are blocks."""
    model, x = deep_mlp(8).eval(), torch.randn(4, 32)
    result = add_skips(model, (x,), SkipConfig(init="preserve"))
    with_gates(result, [0.5] * len(result.skips))
    return result.module.eval(), (x,)


def mlp():
    return deep_mlp(6).eval(), (torch.randn(4, 32),)


def cnn():
    return randomize_bn(plain_cnn()).eval(), (torch.randn(2, 3, 16, 16),)


COPY = {"vit": vit, "resnet": resnet, "convnext": convnext, "skipped_mlp": skipped_mlp,
        "pre_norm_mlp": lambda: (ResidualMLP("pre").eval(), (torch.randn(3, 8),))}
NEW = {"mlp": mlp, "cnn": cnn}


def outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(*inputs)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def grow(build, dtype=torch.float32, **config):
    torch.manual_seed(0)
    model, inputs = build()
    model, inputs = model.to(dtype), tuple(t.to(dtype) for t in inputs)
    config.setdefault("blocks", 1)
    return model, inputs, deepen(model, inputs, DeepenConfig(**config))


# -- exact at insertion ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(COPY) + sorted(NEW))
def test_the_deeper_model_computes_exactly_what_the_original_did(name, dtype):
    model, inputs, result = grow({**COPY, **NEW}[name], dtype)
    assert result.how == ("copy" if name in COPY else "new")
    assert result.blocks and result.parity.max_abs_diff == 0
    want = outputs(model, inputs)
    assert max_diff(outputs(result.module, inputs), want) == 0
    # negative control: each new block is wired in; a non-zero zeroed tensor shows at the output
    for block in result.blocks:
        tensor = result.module.get_parameter(block.zeroed[0])
        with torch.no_grad():
            saved = tensor.clone()
            tensor.normal_()
            assert max_diff(outputs(result.module, inputs), want) > 0, block.name
            tensor.copy_(saved)


def test_the_original_model_is_not_modified():
    model, inputs = vit()
    state = copy.deepcopy(model.state_dict())
    result = deepen(model, inputs, DeepenConfig(blocks=2))
    assert result.module is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_zeroed_weights_get_a_gradient_on_the_first_backward(name):
    model, inputs, result = grow({**COPY, **NEW}[name], blocks=2)
    deeper = copy.deepcopy(result.module).train()
    logits = deeper(*inputs)
    F.cross_entropy(logits, torch.arange(len(logits)) % logits.shape[-1]).backward()
    params = dict(deeper.named_parameters())
    zeroed = [t for b in result.blocks for t in b.zeroed]
    assert zeroed and all(params[t].abs().max() == 0 for t in zeroed)
    for t in zeroed:
        assert params[t].grad is not None and params[t].grad.abs().max() > 0, t


def test_copies_are_copies_of_the_block_they_follow():
    model, inputs, result = grow(vit, blocks=2)
    assert result.new_blocks == ["deepen_blocks_1", "deepen_blocks_3"]   # LLaMA Pro's spread
    deeper, original = result.module, dict(model.named_parameters())
    for block in result.blocks:
        for name, p in deeper.get_submodule(block.name).named_parameters():
            full = f"{block.name}.{name}"
            if full in block.zeroed:
                assert p.abs().max() == 0
            else:
                assert torch.equal(p, original[f"{block.after}.{name}"]), full
    assert sorted(t.rpartition(".")[0].split(".", 1)[1] for t in result.blocks[0].zeroed) == \
        ["attn.proj", "attn.proj", "fc2", "fc2"]   # each branch's last Linear, weight and bias


def test_new_layers_take_the_width_and_kernel_found_there():
    model, inputs, result = grow(cnn, how="new", blocks=None, where=("0.3", "0.14"))
    layers = [result.module.get_submodule(b.name) for b in result.blocks]
    assert all(isinstance(m, ResidualLayer) for m in layers)
    assert [(m.layer.in_channels, m.layer.kernel_size) for m in layers] == [(8, (3, 3)),
                                                                           (32, (3, 3))]
    assert [b.layer for b in result.blocks] == ["Conv2d 3x3, 8 channels",
                                                "Conv2d 3x3, 32 channels"]
    assert all(isinstance(m.norm, torch.nn.BatchNorm2d) for m in layers)   # as the neighbour
    _, _, lin = grow(mlp, how="new", blocks=1)
    block = lin.module.get_submodule(lin.new_blocks[0])
    assert isinstance(block.layer, torch.nn.Linear) and block.layer.in_features == 32


# -- positions: chosen or rejected with a reason ----------------------------------------------

def _verdicts(result):
    return {p.name: (p.reason.value if p.reason else None) for p in result.positions}


def test_positions_follow_blocks_and_where():
    _, _, result = grow(vit, blocks=2)
    assert _verdicts(result) == {"blocks.0": "spread", "blocks.1": None, "blocks.2": "spread",
                                 "blocks.3": None}
    _, _, result = grow(vit, blocks=None, where=("blocks.0", "blocks.2"))
    assert result.new_blocks == ["deepen_blocks_0", "deepen_blocks_2"]
    assert _verdicts(result)["blocks.1"] == "excluded"
    with pytest.raises(ConfigError, match="blocks=5 but only 4"):
        grow(vit, blocks=5)
    with pytest.raises(ConfigError, match="no position matches"):
        grow(vit, where=("nothing.*",))


@pytest.mark.parametrize("kind, reason", [("post", "not-identity"),
                                          ("sigmoid", "no-branch-end"),
                                          ("scaled", "not-identity")])
def test_blocks_whose_copy_cannot_be_the_identity_are_rejected(kind, reason):
    torch.manual_seed(0)
    model, x = ResidualMLP(kind).eval(), torch.randn(3, 8)
    with pytest.raises(ConfigError, match="no position qualifies.*try how='new'"):
        deepen(model, (x,), DeepenConfig(blocks=1, how="copy"))
    result = deepen(model, (x,), DeepenConfig(blocks=1))   # auto falls back to new layers
    assert result.how == "new" and result.parity.max_abs_diff == 0
    from ressurgeon.analysis.layers import analyze_graph
    from ressurgeon.deepen.positions import block_positions
    from ressurgeon.trace import trace_model

    positions = block_positions(analyze_graph(trace_model(model, (x,))))
    assert {p.reason.value for p in positions} == {reason}
    assert all(p.detail for p in positions)


def test_a_projection_block_is_rejected_and_its_neighbour_chosen():
    _, _, result = grow(resnet)
    assert _verdicts(result) == {"layer2.0": "changes-shape", "layer2.1": None}
    zeroed = result.blocks[0].zeroed   # the branch ends in BatchNorm: its scale and shift
    assert zeroed == ("deepen_layer2_1.bn2.weight", "deepen_layer2_1.bn2.bias")


def test_new_layer_positions_exclude_the_head():
    _, _, result = grow(mlp, blocks=1)
    assert _verdicts(result)["12"] == "head" and result.new_blocks == ["deepen_10"]


# -- round trips, fold, unfold --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_state_dict_and_pt2_round_trips(name, tmp_path):
    model, inputs, result = grow({**COPY, **NEW}[name], blocks=2)
    want = outputs(model, inputs)
    again = grow({**COPY, **NEW}[name], blocks=2)[2].module
    with torch.no_grad():   # a fresh deepening has other values until the state_dict arrives
        next(again.get_submodule(result.new_blocks[0]).parameters()).add_(1)
    again.load_state_dict(result.module.state_dict(), strict=True)
    assert max_diff(outputs(again, inputs), want) == 0
    save_model(result.module, tmp_path / "deeper.pt2", inputs)
    loaded = load_model(tmp_path / "deeper.pt2")
    assert max_diff(outputs(loaded, inputs), want) == 0
    assert freeze_except(loaded, result.new_blocks) == sum(
        1 for n, _ in result.module.named_parameters()
        if any(n.startswith(b + ".") for b in result.new_blocks))


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    from ressurgeon import export_onnx

    _, inputs, result = grow(cnn, blocks=2)
    report = export_onnx(result.module, tmp_path / "deeper.onnx", inputs)
    assert report.parity_checked and report.max_abs_diff <= report.tolerance


@pytest.mark.parametrize("name", ["vit", "cnn", "resnet"])
def test_fold_removes_new_blocks_that_are_still_zero(name, tmp_path):
    model, inputs, result = grow({**COPY, **NEW}[name], blocks=2 if name != "resnet" else 1)
    branches = sum(len({t.rpartition(".")[0] for t in b.zeroed}) for b in result.blocks)
    folded = fold(result.module, inputs)
    assert len(folded.branches_removed) == branches
    assert not any(n.startswith("deepen_") and any(True for _ in m.parameters())
                   for n, m in folded.module.named_modules())   # (a ReLU may stay: relu(x) = x)
    assert folded.max_abs_diff <= folded.tolerance
    plain = fold(model, inputs)   # the deeper model folds to what the original folds to
    relus = len(result.blocks) if name == "resnet" else 0   # relu(x) of the copy's x >= 0 stays
    assert folded.ops_after == plain.ops_after + relus
    # from a .pt2 too; a block trained since stays, with its branch
    save_model(result.module, tmp_path / "untrained.pt2", inputs)
    untrained = fold(load_model(tmp_path / "untrained.pt2"), inputs)
    assert len(untrained.branches_removed) == branches
    trained = result.blocks[0]
    with torch.no_grad():
        result.module.get_parameter(trained.zeroed[0]).fill_(0.01)
    save_model(result.module, tmp_path / "trained.pt2", inputs)
    folded = fold(load_model(tmp_path / "trained.pt2"), inputs)
    assert len(folded.branches_removed) == branches - 1
    assert trained.zeroed[0].rpartition(".")[0] not in folded.branches_removed
    assert folded.ops_after > untrained.ops_after
    assert folded.max_abs_diff <= folded.tolerance


def test_unfold_removes_only_blocks_still_the_identity():
    model, inputs, result = grow(vit, blocks=2)
    with torch.no_grad():
        result.module.get_parameter(result.blocks[1].zeroed[0]).fill_(0.01)
    assert result.still_identity() == [result.new_blocks[0]]
    smaller = result.unfold()
    names = {n for n, _ in smaller.named_children()}
    assert result.new_blocks[0] not in names and result.new_blocks[1] in names
    assert max_diff(outputs(smaller, inputs), outputs(result.module, inputs)) == 0
    smaller.train()(*inputs).sum().backward()   # still trainable


def test_training_helpers_see_the_new_blocks():
    model, inputs, result = grow(vit, blocks=2)
    new = {n for n, _ in result.module.named_parameters()
           if n.split(".")[0] in result.new_blocks}
    groups = {g["name"]: g for g in param_groups(result.module, 1e-3, extra=result.new_blocks)}
    assert {id(p) for p in groups["added"]["params"]} == {
        id(p) for n, p in result.module.named_parameters() if n in new}
    assert freeze_except(result.module, result.new_blocks) == len(new)
    assert {n for n, p in result.module.named_parameters() if p.requires_grad} == new


def test_deepening_a_shortcut_model_copies_its_spans_with_plain_adds():
    model, inputs, result = grow(skipped_mlp, blocks=2)
    assert all(p.name.startswith("skip_") for p in result.positions)
    for block in result.blocks:   # the copy joins with a plain add, not a gated Shortcut
        assert not any(isinstance(m, Shortcut) for m in
                       result.module.get_submodule(block.name).modules())
    assert len(find_shortcuts(result.module)) == len(find_shortcuts(model))
    with torch.no_grad():   # the original's gates still act; the copies have none
        for m in result.module.modules():
            if isinstance(m, Shortcut):
                m.gate.zero_()
        assert max_diff(outputs(result.module, inputs), outputs(model, inputs)) > 0


# -- plans ----------------------------------------------------------------------------------------

def test_a_plan_round_trips_and_may_repeat_a_position():
    model, inputs, result = grow(vit, blocks=2)
    plan = DeepenPlan.from_json(result.plan.to_json())
    assert plan == result.plan
    twice = DeepenPlan(plan.config, (PlannedBlock("blocks.2", "copy"),) * 2)
    again = deepen(model, inputs, plan=twice)
    assert again.new_blocks == ["deepen_blocks_2", "deepen_blocks_2_1"]
    assert again.parity.max_abs_diff == 0
    assert {p.name: p.reason and p.reason.value for p in again.positions}["blocks.0"] == \
        "not-in-plan"
    with pytest.raises(PlanError, match="no copy position"):
        deepen(model, inputs, plan=DeepenPlan(plan.config, (PlannedBlock("head", "copy"),)))
    with pytest.raises(PlanError, match="takes copy blocks"):
        deepen(model, inputs, plan=DeepenPlan(plan.config, (PlannedBlock("blocks.0", "new"),)))
    post = ResidualMLP("post").eval()
    with pytest.raises(PlanError, match="no block can go after blocks.1"):
        deepen(post, (torch.randn(2, 8),), plan=DeepenPlan(DeepenConfig(blocks=1, how="copy"),
                                                           (PlannedBlock("blocks.1", "copy"),)))


def test_bad_configs_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--blocks N"):
        DeepenConfig()
    with pytest.raises(ConfigError, match="how must be one of auto, copy, new"):
        DeepenConfig(blocks=1, how="deeper")
    with pytest.raises(ConfigError, match="blocks must be an integer >= 1"):
        DeepenConfig(blocks=0)
    assert DeepenConfig.from_dict(DeepenConfig(blocks=2, where="a.*").to_dict()) == \
        DeepenConfig(blocks=2, where=("a.*",))


# -- transformers models in memory ----------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    return transformers, tiny_llama_lm().eval()


def test_a_transformers_model_is_deepened_in_its_layer_list(llama, tmp_path):
    transformers, model = llama
    ids = torch.randint(0, 64, (2, 9))
    result = deepen(model, (ids,), DeepenConfig(blocks=2))
    deeper = result.module
    assert type(deeper) is type(model) and result.method == "transformers"
    assert result.new_blocks == ["model.layers.2", "model.layers.5"]
    assert deeper.config.num_hidden_layers == 6 and model.config.num_hidden_layers == 4
    assert result.config_keys == ("num_hidden_layers",)
    assert [layer.self_attn.layer_idx for layer in deeper.model.layers] == list(range(6))
    with torch.no_grad():
        assert torch.equal(deeper(ids).logits, model(ids).logits)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(deeper.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert freeze_except(deeper, result.new_blocks) == 2 * 9
    deeper.save_pretrained(tmp_path / "pro")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pro").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="copies of its layers"):
        deepen(model, (ids,), DeepenConfig(blocks=1, how="new"))


def test_a_transformers_model_unfolds_to_its_original_depth(llama):
    _, model = llama
    ids = torch.randint(0, 64, (1, 7))
    result = deepen(model, (ids,), DeepenConfig(blocks=2))
    smaller = result.unfold()
    assert smaller.config.num_hidden_layers == 4 and len(smaller.model.layers) == 4
    with torch.no_grad():
        result.module.model.layers[5].mlp.down_proj.weight.fill_(0.01)
        assert torch.equal(smaller(ids).logits, model(ids).logits)
    kept = result.unfold()
    assert kept.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in kept.model.layers] == list(range(5))
