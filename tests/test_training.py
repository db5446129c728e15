"""ressurgeon.training and init "morph": exact at insertion, opened by a ramp, optimizer groups."""

import pytest
import torch
import torch.nn.functional as F

from models import deep_mlp, plain_cnn
from ressurgeon import ConfigError, Shortcut, SkipConfig, add_skips, fold, gate_report
from ressurgeon import load_model, save_model
from ressurgeon.training import GATE_LR_SCALE, ShortcutRamp, freeze_except, param_groups


def morph(model, x):
    result = add_skips(model, (x,), SkipConfig(init="morph"))
    assert result.skips and result.parity.max_abs_diff == 0  # exact at insertion
    return result


def test_morph_is_exact_until_the_ramp_moves_then_becomes_rezero():
    torch.manual_seed(0)
    model, x = deep_mlp(8).eval(), torch.randn(16, 32)
    result = morph(model, x)
    ramp = ShortcutRamp(result.module, steps=4)
    values = [ramp.step() for _ in range(5)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0]
    rezero = add_skips(model, (x,), SkipConfig(init="rezero"))
    rezero.module.load_state_dict({k: v for k, v in result.module.state_dict().items()
                                   if not k.endswith(".ramp")})
    torch.testing.assert_close(result.module(x), rezero.module(x), rtol=0, atol=1e-6)


def test_every_new_tensor_gets_a_gradient_on_the_first_ramped_step():
    torch.manual_seed(0)
    model, x = plain_cnn().eval(), torch.randn(4, 3, 16, 16)
    result = morph(model, x)
    ShortcutRamp(result.module, steps=10).step()
    result.module.train()
    F.cross_entropy(result.module(x), torch.randint(0, 5, (4,))).backward()
    for m in result.module.modules():
        if isinstance(m, Shortcut):
            assert m.gate.grad is not None and m.gate.grad.abs() > 0
            for p in m.proj.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0


def test_fold_removes_closed_morph_shortcuts_and_absorbs_trained_ones():
    torch.manual_seed(0)
    model, x = deep_mlp(8).eval(), torch.randn(8, 32)
    result = morph(model, x)
    assert fold(result.module, (x,)).counts() == {"removed": 3}       # c = 0, a = 0
    ShortcutRamp(result.module, steps=1).step()
    assert fold(result.module, (x,)).counts() == {"span-removed": 3}  # c = 1, a = 0
    with torch.no_grad():
        for m in result.module.modules():
            if isinstance(m, Shortcut):
                m.gate.fill_(0.3)
    folded = fold(result.module, (x,))
    assert folded.counts() == {"absorbed": 3} and folded.max_abs_diff <= folded.tolerance


def test_a_morph_archive_reloads_with_its_ramp_and_init(tmp_path):
    model, x = deep_mlp(6).eval(), torch.randn(4, 32)
    result = morph(model, x)
    ShortcutRamp(result.module, steps=2).step()
    save_model(result.module, tmp_path / "m.pt2", (x,))
    reloaded = load_model(tmp_path / "m.pt2")
    ramps = [float(m.ramp) for m in reloaded.modules() if isinstance(m, Shortcut)]
    assert ramps and all(r == 0.5 for r in ramps)
    assert {g.init for g in gate_report(reloaded).gates} == {"morph"}
    torch.testing.assert_close(reloaded(x), result.module(x), rtol=0, atol=1e-6)


def test_param_groups_keep_gates_apart_without_decay():
    model, x = plain_cnn().eval(), torch.randn(2, 3, 16, 16)
    result = morph(model, x)
    groups = {g["name"]: g for g in param_groups(result.module, 1e-3, weight_decay=0.01)}
    assert set(groups) == {"weights", "added", "gates:morph"}
    assert groups["gates:morph"]["weight_decay"] == 0
    assert groups["gates:morph"]["lr"] == pytest.approx(1e-3 * GATE_LR_SCALE["morph"])
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(result.module.parameters()))
    torch.optim.AdamW(list(groups.values()))  # any optimizer takes them
    with pytest.raises(ConfigError):
        param_groups(result.module, -1.0)


def test_freeze_except_and_ramp_errors():
    model, x = deep_mlp(6).eval(), torch.randn(4, 32)
    result = add_skips(model, (x,))
    names = [s.name for s in result.skips]
    assert freeze_except(result.module, names) == sum(1 for _ in names)  # one gate each
    with pytest.raises(ConfigError, match="no morph shortcut"):
        ShortcutRamp(result.module, steps=3)
    with pytest.raises(ConfigError, match="no module named"):
        freeze_except(result.module, ["nope"])
