"""The retrofit study (examples/retrofit_study.py): its --quick run, and its deletion probe."""

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

from examples import retrofit_study as rs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("retrofit")
    torch.set_num_threads(1)
    rs.main(["--quick", "--out", str(out)])
    return out, json.loads((out / "retrofit_study.json").read_text())


@pytest.mark.slow   # needs the --quick run (about a minute)
def test_quick_writes_every_recipe_with_finite_numbers(quick):
    out, report = quick
    assert (out / "retrofit_study.png").read_bytes().startswith(PNG)
    table = (out / "retrofit_study.md").read_text()
    assert table.startswith("Command: `python examples/retrofit_study.py --quick")
    assert "## Key table" in table and "## Findings" in table
    settings = set(report["settings"])
    assert settings == set(rs.QUICK_SETTINGS)
    for setting in settings:
        runs = [r for r in report["runs"] if r["setting"] == setting]
        assert {r["recipe"] for r in runs} == set(rs.RECIPES), setting
        for r in runs:
            recipe = rs.RECIPES[r["recipe"]]
            keys = ["acc_ep1", "acc_ft", "cpu"]
            if not recipe.from_scratch:
                keys += ["max_change", "acc_surgery"]
            if not recipe.shallow:
                keys += ["del_drop", "acc_all_deleted"]
            for key in keys:
                value, where = r[key], (setting, r["recipe"], key)
                assert isinstance(value, float) and math.isfinite(value), where
            assert len(r["acc_epochs"]) == report["budget"]["finetune_epochs"]
        assert set(report["summary"][setting]["recipes"]) == set(rs.RECIPES)


@pytest.mark.slow   # needs the --quick run (about a minute)
def test_exact_recipes_keep_the_trained_function(quick):
    _, report = quick
    exact = {name for name, r in rs.RECIPES.items() if r.exact}
    assert exact == {"preserve", "preserve_x30", "morph", "morph_x1"}
    for r in report["runs"]:
        if r["recipe"] in exact:
            assert r["max_change"] == 0.0, r["recipe"]
            pre = next(p for p in report["pretrained"]
                       if (p["setting"], p["seed"]) == (r["setting"], r["seed"]))
            assert r["acc_surgery"] == pre["acc"]
        elif r["recipe"] in ("rezero", "standard"):
            assert r["max_change"] > 0  # negative control: the measure sees a change


def test_deleting_a_block_leaves_its_shortcut_term():
    # a trained-looking MLP: rezero's blocks reduced to x are the identity, so deleting every
    # block leaves stem -> last layer -> head; the plain twin with no deletion is the plain net
    data = {"x_train": torch.randn(16, 64), "x_test": torch.randn(32, 64),
            "y_test": torch.zeros(32, dtype=torch.long)}
    torch.manual_seed(0)
    net = rs.digits_mlp(6, 64).eval()
    s = rs.surgery(net, data, "rezero", span=2, seed=0)
    assert s.blocks == s.skips and len(s.blocks) == 2
    x = data["x_test"]
    with torch.no_grad(), rs.reduced(s.module.eval(), {b: "x" for b in s.blocks}):
        deleted = s.module(x)
    with torch.no_grad():
        expected = net[12](net[11](net[10](net[1](net[0](x)))))
    assert torch.equal(deleted, expected)
    twin = rs.plain_twin(net, data, span=2)   # raises if it is not exactly the plain net
    with torch.no_grad(), rs.reduced(twin.module, {**twin.base, twin.blocks[0]: "x"}):
        one = twin.module(x)
    with torch.no_grad():
        h = net[1](net[0](x))                  # layers 1 and 2 (modules 2-5) are gone
        expected = net[12](net[11](net[10](net[9](net[8](net[7](net[6](h)))))))
    assert torch.equal(one, expected)
    assert not any("forward" in vars(m) for m in s.module.modules())  # restored
