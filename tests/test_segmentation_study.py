"""The segmentation study (examples/segmentation_study.py): its --quick run, in-process."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from examples import segmentation_study as ss

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmentation")
    before = torch.get_num_threads()
    try:
        ss.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    return out, json.loads((out / "segmentation_study.json").read_text())


def test_quick_writes_every_variant_with_finite_numbers(quick):
    out, report = quick
    assert (out / "segmentation_study.png").read_bytes().startswith(PNG)
    table = (out / "segmentation_study.md").read_text()
    assert table.startswith("Command: `python examples/segmentation_study.py --quick")
    runs = report["runs"]
    assert len(runs) == len(ss.VARIANTS) * report["budget"]["seeds"]
    for r in runs:
        assert 0.0 <= r["miou"] <= 1.0 and len(r["per_class"]) == len(ss.CLASSES)
        assert len(r["losses"]) == len(r["miou_curve"]) == report["budget"]["epochs"]
        assert all(math.isfinite(v) for v in r["losses"])
        # chain and mirror concat add parameters; mirror add's long skips are identities here
        assert (r["params_added"] > 0) == (r["variant"] in ("chain", "mirror_concat"))
    assert set(report["summary"]) == set(ss.VARIANTS)
    for label in (v.label for v in ss.VARIANTS.values()):
        assert label in table


def test_the_generated_task_has_every_class_and_is_seeded():
    images, labels = ss.make_shapes(16, 24, seed=3)
    assert images.shape == (16, 1, 24, 24) and labels.shape == (16, 24, 24)
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    again, same = ss.make_shapes(16, 24, seed=3)
    assert torch.equal(images, again) and torch.equal(labels, same)
    # IoU from a confusion matrix: a perfect prediction is 1 for every class present
    matrix = torch.diag(torch.tensor([5, 3, 0, 2]))
    assert ss.iou(matrix)[:2] == [1.0, 1.0] and math.isnan(ss.iou(matrix)[2])
