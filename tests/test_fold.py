"""Stage fold: shortcuts, BatchNorm and gates folded into the weights for inference.

Tolerances, each relative to the output scale max(1, max |output|):

| name      | value | reason                                                                 |
|-----------|-------|------------------------------------------------------------------------|
| EXACT     | 0     | zero gates removed without BN folding: h + 0*S(x) = h, no new float op  |
| BN_FOLD   | 1e-5  | BN folded into conv weights: W*gamma/std rounds once per weight (fp32)  |
| MERGE     | 1e-4  | the issue's bound for merged/rescaled kernels (fp32, 5-10 layers deep)  |
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from examples.models import plain_vgg
from helpers import run_cli
from models import FAMILIES, PlainTransformer, build, plain_cnn, randomize_bn
from ressurgeon import RessurgeonError, Shortcut, ShapeError, SkipConfig, add_skips
from ressurgeon.save import save_model
from ressurgeon.fold import fold
from ressurgeon.load import load_model

EXACT, BN_FOLD, MERGE = 0.0, 1e-5, 1e-4
ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
MULS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def strided_cnn() -> nn.Sequential:
    """conv+BN+ReLU blocks with no pooling, one of them strided: every span-1 shortcut is linear."""
    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 8), *block(8, 8), *block(8, 16, stride=2), *block(16, 16),
                         *block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def identity_cnn() -> nn.Sequential:
    """Two stages of same-width convs: span-2 shortcuts are identities around two layers."""
    return plain_vgg(widths=(8, 8, 8, 8, 8, "M", 16, 16, 16, 16, 16), classes=3)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def rel_diff(a, b) -> float:
    return ((a - b).abs().max() / max(1.0, a.abs().max().item())).item()


def set_gates(module, value) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, Shortcut) and m.gate is not None:
            m.gate.data.fill_(value(n) if callable(value) else value)
            n += 1
    return n


def ops(gm: fx.GraphModule, targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def modules_of(gm: fx.GraphModule, cls) -> int:
    return sum(isinstance(m, cls) for m in gm.modules())


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return randomize_bn(plain_cnn()).eval(), torch.randn(2, 3, 16, 16)


def test_untouched_zero_gates_leave_no_adds_and_exact_outputs(cnn):
    model, x = cnn
    result = add_skips(model, (x,), SkipConfig(span=2))
    folded = fold(result.module, (x,), fold_batchnorm=False)
    assert [s.outcome for s in folded.skips] == ["removed"] * len(result.skips)
    assert modules_of(folded.module, Shortcut) == 0 and ops(folded.module, ADDS + MULS) == 0
    assert torch.equal(outputs(folded.module, x), outputs(model, x))           # EXACT
    assert folded.ops_after < folded.ops_before


def test_zero_gates_with_batchnorm_folded(cnn):
    model, x = cnn
    folded = fold(add_skips(model, (x,), SkipConfig(span=1)).module, (x,))
    assert modules_of(folded.module, nn.BatchNorm2d) == 0 and len(folded.batchnorms_folded) == 6
    assert ops(folded.module, ADDS + MULS) == 0
    assert rel_diff(outputs(model, x), outputs(folded.module, x)) <= BN_FOLD
    assert not folded.module.training and folded.eval_only


@pytest.mark.parametrize("init", ["preserve", "rezero", "standard"])
def test_span1_conv_bn_shortcuts_merge_into_the_conv(init):
    torch.manual_seed(0)
    model, x = randomize_bn(strided_cnn()).eval(), torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=1, init=init))
    assert {s.kind for s in result.skips} == {"identity", "projection"}   # one strided projection
    set_gates(result.module, 0.5)
    folded = fold(result.module, (x,))
    assert [s.outcome for s in folded.skips] == ["merged"] * len(result.skips)
    assert ops(folded.module, ADDS + MULS) == 0 and modules_of(folded.module, nn.BatchNorm2d) == 0
    assert modules_of(folded.module, nn.Conv2d) == 5                        # no projection left
    want = outputs(result.module, x)
    assert rel_diff(want, outputs(folded.module, x)) <= MERGE
    # negative control: the merged kernels carry the gate, so another gate gives other outputs
    set_gates(result.module, 0.0 if init != "standard" else 0.5)
    if init != "standard":
        assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) > 1e-3


def test_plain_cnn_span1_merges_every_shortcut_into_its_conv(cnn):
    model, x = cnn
    result = add_skips(model, (x,), SkipConfig(span=1))
    set_gates(result.module, 0.5)
    folded = fold(result.module, (x,))
    by_kind = {(s.kind, s.outcome) for s in folded.skips}
    # a span after a max-pool reads the pooled tensor: an unstrided 1x1 projection of the
    # conv's own input, which merges into the conv's kernel like an identity does
    assert by_kind == {("identity", "merged"), ("projection", "merged")}
    assert ops(folded.module, MULS) == 0
    assert ops(folded.module, ADDS) == sum(s.outcome == "absorbed" for s in folded.skips)
    assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) <= MERGE


def test_trained_identity_gates_are_absorbed_into_plain_fusable_adds():
    torch.manual_seed(0)
    model, x = randomize_bn(identity_cnn()).eval(), torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=2))
    n = set_gates(result.module, lambda i: 0.3 + 0.1 * i)
    folded = fold(result.module, (x,))
    assert [s.outcome for s in folded.skips] == ["absorbed"] * n
    assert ops(folded.module, MULS) == 0 and ops(folded.module, ADDS) == n
    assert folded.fusion_eligible == n and {s.fusion for s in folded.skips} == {"conv+add+act"}
    assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) <= MERGE


def test_negative_identity_gate_stays_a_mul_and_says_why():
    torch.manual_seed(0)
    model, x = randomize_bn(identity_cnn()).eval(), torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=2))
    set_gates(result.module, -0.5)
    folded = fold(result.module, (x,))
    kept = folded.gates_kept
    assert kept and all("negative" in why for why in kept.values())
    assert ops(folded.module, MULS) == len(kept)
    assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) <= MERGE


def test_layernorm_stops_absorption_with_a_reason():
    torch.manual_seed(0)
    model, x = PlainTransformer().eval(), torch.randn(2, 5, 8)
    result = add_skips(model, (x,), SkipConfig(span=2))
    set_gates(result.module, 0.5)
    folded = fold(result.module, (x,))
    assert any("LayerNorm" in why for why in folded.gates_kept.values())
    assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) <= MERGE


def test_rezero_zero_gate_removes_the_span_not_the_shortcut(cnn):
    model, x = cnn
    result = add_skips(model, (x,), SkipConfig(span=2, init="rezero"))
    folded = fold(result.module, (x,), fold_batchnorm=False)
    assert {s.outcome for s in folded.skips} == {"span-removed"}
    # each block now computes S(x) alone: its two convs are gone, its projection stays
    convs_before = modules_of(model, nn.Conv2d)
    assert modules_of(folded.module, nn.Conv2d) == convs_before - 2 * len(result.skips) + sum(
        s.kind == "projection" for s in result.skips)
    assert torch.equal(outputs(folded.module, x), outputs(result.module, x))   # EXACT


def test_fold_of_a_reloaded_pt2_recognises_the_exported_shortcuts(tmp_path):
    torch.manual_seed(0)
    model, x = randomize_bn(identity_cnn()).eval(), torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=2))
    n = set_gates(result.module, 0.5)
    save_model(result.module, tmp_path / "m.pt2", (x,))
    folded = fold(load_model(tmp_path / "m.pt2"), (x,))
    assert [s.outcome for s in folded.skips] == ["absorbed"] * n
    assert ops(folded.module, MULS) == 0
    assert rel_diff(outputs(result.module, x), outputs(folded.module, x)) <= MERGE


def test_input_is_untouched_and_plain_modules_need_inputs(cnn):
    model, x = cnn
    result = add_skips(model, (x,), SkipConfig(span=1))
    set_gates(result.module, 0.5)
    before = {k: v.clone() for k, v in result.module.state_dict().items()}
    fold(result.module, (x,))
    after = result.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert modules_of(result.module, Shortcut) == len(result.skips)
    with pytest.raises(ShapeError, match="needs example inputs"):
        fold(model)
    assert fold(model, (x,)).batchnorms_folded        # any nn.Module: traced, BN folded


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_folds_exactly(name):
    model, inputs = build(name)
    result = add_skips(model, inputs, SkipConfig(span=2))
    if not result.skips:
        pytest.skip("no shortcut in this family")
    set_gates(result.module, lambda i: 0.4 + 0.1 * i)
    folded = fold(result.module, inputs)        # raises VerificationError beyond FOLD_RTOL
    assert folded.max_abs_diff <= folded.tolerance
    assert len(folded.skips) == len(result.skips)


# -- the fold command ------------------------------------------------------------------------

def test_fold_command_writes_pt2_and_onnx(example_models, tmp_path):
    skips = tmp_path / "vgg_skips.pt2"
    assert run_cli("add-skips", example_models["vgg"], "--span", "1", "-o", skips,
                   "-q").exit_code == 0
    out, onnx = tmp_path / "folded.pt2", tmp_path / "folded.onnx"
    result = run_cli("fold", skips, "-o", out, "--onnx", onnx, "--json")
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(result.stdout)
    assert report["counts"] == {"removed": 7} and report["output"] == str(out)
    assert report["onnx"]["parity_checked"] and out.exists() and onnx.exists()
    x = torch.randn(3, 3, 32, 32)
    folded, original = torch.export.load(out).module(), torch.export.load(skips).module()
    assert rel_diff(original(x), folded(x)) <= BN_FOLD
    result = run_cli("fold", skips, "-o", skips)
    assert result.exit_code == 2 and "never overwrites its input" in result.stderr


def test_errors_are_ressurgeon_errors():
    with pytest.raises(RessurgeonError):
        fold(nn.Linear(2, 2))


@pytest.mark.parametrize("init,outcome", [("preserve", "removed"), ("rezero", "span-removed")])
def test_identity_shortcuts_read_back_from_pt2_keep_their_init(tmp_path, init, outcome):
    torch.manual_seed(0)
    model = randomize_bn(plain_cnn()).eval()
    x = torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), SkipConfig(span=1, init=init))
    save_model(result.module, tmp_path / "m.pt2", (x,))
    folded = fold(load_model(tmp_path / "m.pt2"), (x,))
    identity = [s for s in folded.skips if s.kind == "identity"]
    assert identity and all(s.init == init and s.outcome == outcome for s in identity)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm subclass that also applies a ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class StdConv(nn.Conv2d):
    """timm's StdConv2d in miniature: the weight is standardised per output channel."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_subclasses_with_their_own_forward_are_not_folded_as_their_parents():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 8, 3, padding=1), BNAct(8), StdConv(8, 8, 3, padding=1),
                          BNAct(8), StdConv(8, 8, 3, padding=1), BNAct(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 8, 8)
    randomize_bn(model)
    result = add_skips(model.eval(), (x,), SkipConfig(span=1))
    set_gates(result.module, 0.5)
    folded = fold(result.module, (x,))  # raises if anything were folded as its parent
    assert folded.batchnorms_folded == []
    assert folded.max_abs_diff <= folded.tolerance
    assert {s.outcome for s in folded.skips} <= {"kept", "absorbed", "plain"}
