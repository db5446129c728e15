"""The joins study (examples/joins_study.py): its --quick run, in-process."""

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")

from examples import joins_study as js

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("joins")
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matmuls on a busy 2-core machine
    try:
        js.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    return out, json.loads((out / "joins_study.json").read_text())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow   # needs the --quick run (about a minute)
def test_quick_writes_every_variant_with_finite_numbers(quick):
    out, report = quick
    assert (out / "joins_study.png").read_bytes().startswith(PNG)
    table = (out / "joins_study.md").read_text()
    assert table.startswith("Command: `python examples/joins_study.py --quick")
    assert "onnxruntime" in table.splitlines()[0] and "torch" in table.splitlines()[0]
    assert "## Training from scratch" in table and "## Inference cost" in table
    runs = report["runs"]
    for net in js.QUICK_NETS:
        mine = [r for r in runs if r["net"] == net]
        assert {r["variant"] for r in mine} == set(js.VARIANTS), net
        assert len(mine) == len(js.VARIANTS) * report["budget"]["seeds"]
        for r in mine:
            where = (net, r["variant"], r["seed"])
            assert len(r["losses"]) == report["budget"]["epochs"], where
            for key in ("test_acc", "final_loss", "max_change", "seconds"):
                assert _finite(r[key]), (*where, key)
            assert all(map(_finite, r["losses"])), where
            assert (r["skips"] > 0) == (r["variant"] != "plain"), where
        assert set(report["summary"][net]) == set(js.VARIANTS)
    # the latency of one variant per join, both forms, against plain and its own noise floor
    cost = report["latency"][js.QUICK_NETS[0]]
    assert set(cost["variants"]) == {"plain", *js.QUICK_LATENCY}
    for batch in map(str, report["budget"]["latency_batches"]):
        assert _finite(cost["noise_floor"][batch]) and cost["plain_ms"][batch] > 0
        for name in js.QUICK_LATENCY:
            for form in ("trained", "folded"):
                assert _finite(cost["variants"][name][form]["ratio"][batch]), (name, form)


@pytest.mark.slow   # needs the --quick run (about a minute)
def test_exact_inits_are_exact_at_insertion(quick):
    _, report = quick
    exact = {name for name, v in js.VARIANTS.items() if v.exact}
    assert exact == {"concat_preserve", "highway_preserve"}
    for r in report["runs"]:
        if r["variant"] in exact:
            assert r["max_change"] == 0.0, r["variant"]
            assert r["opened_at_insertion"] == 0.0, r["variant"]
            # nothing to fold into the weights yet: the whole join goes
            assert r["fold_at_insertion"] == {"removed": r["skips"]}, r["variant"]
        elif r["variant"] != "plain":
            assert r["max_change"] > 0, r["variant"]  # negative control: the measure sees it
    # after training the exact joins have opened and fold keeps them (widened / gated)
    after = {r["variant"]: r for r in report["runs"] if r["seed"] == 0 and r["net"] == "mlp4"}
    assert after["concat_preserve"]["opened_after"] > 0
    assert "removed" not in after["concat_preserve"]["fold_after"]
    assert after["highway_preserve"]["fold_after"] == {"kept": after["highway_preserve"]["skips"]}


def test_variants_of_one_seed_start_from_the_same_plain_weights():
    data = js.td.load_data(0)
    budget = js.Budget()
    plain, _, _ = js.build("mlp6", js.VARIANTS["plain"], data, budget, seed=3)
    _, widened, result = js.build("mlp6", js.VARIANTS["concat_standard"], data, budget, seed=3)
    assert len(result.skips) == 2
    first = plain.get_parameter("0.weight")
    assert torch.equal(widened.get_parameter("0.weight"), first)
