"""The recurrent study (examples/recurrent_study.py): its --quick run, in-process."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from examples import recurrent_study as rs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("recurrent")
    before = torch.get_num_threads()
    try:
        runs = rs.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    return out, runs, json.loads((out / "recurrent_study.json").read_text())


def test_quick_writes_every_variant_with_finite_numbers(quick):
    out, runs, report = quick
    assert (out / "recurrent_study.png").read_bytes().startswith(PNG)
    table = (out / "recurrent_study.md").read_text()
    assert table.startswith("Command: `python examples/recurrent_study.py --quick")
    seeds = report["settings"]["seeds"]
    assert {(r["part"], r["variant"], r["seed"]) for r in report["runs"]} == {
        (part, v, seed) for part, vs in (("scratch", rs.SCRATCH), ("retrofit", rs.RETROFIT))
        for v in vs for seed in seeds}
    depth = report["settings"]["depth"]
    for r in report["runs"]:
        # the fused nn.LSTM(num_layers=8) is split: a shortcut between each pair of layers
        assert r["shortcuts"] == (0 if r["variant"] == "plain" else depth - 1)
        assert all(math.isfinite(loss) for _, _, loss in r["curve"])
        assert r["curve"][-1][0] == (report["settings"]["steps"] if r["part"] == "scratch"
                                     else report["settings"]["more_steps"])
        assert r["grad_first"] > 0
    for label in rs.LABELS.values():
        assert label in table
    assert not list(out.glob(".*"))   # no temporary file left behind


def test_retrofits_start_from_the_trained_function_and_scratch_from_the_same_weights(quick):
    _, runs, _ = quick
    for seed in {r.seed for r in runs}:
        mine = {(r.part, r.variant): r for r in runs if r.seed == seed}
        trained = mine["scratch", "plain"].final_loss
        for variant in rs.RETROFIT:   # preserve and morph are exact at insertion
            assert mine["retrofit", variant].curve[0][2] == pytest.approx(trained, abs=1e-6)
            assert mine["retrofit", variant].extra["change_at_insertion"] <= 1e-6
        # standard shortcuts change the function, but reach the first layer: far larger gradient
        assert mine["scratch", "standard"].grad_first > 100 * mine["scratch", "plain"].grad_first


def test_the_split_model_computes_what_the_fused_one_does():
    torch.manual_seed(0)
    model = rs.ByteLSTM(8, 3).eval()
    x = torch.randint(0, 256, (2, 7))
    copy_, count, change = rs.with_shortcuts(model, "preserve", x)
    assert count == 2 and change == 0.0
    y = torch.randint(0, 256, (3, 11))   # another batch size and length: still exact
    out = copy_.eval()(y)
    assert out.shape == (3, 11, 256) and torch.equal(out, model(y))
