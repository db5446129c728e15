"""Optional zoo: add_skips and ONNX export on torchvision / timm architectures (weights=None).

Runs only when selected AND installed, e.g. in the venv that benchmarks/zoo.py describes:

    /work/zoo-venv/bin/python -m pytest -m zoo tests/test_zoo.py

The model list, input sizes and the exclusions (each with its reason) live in
``benchmarks/zoo.py``, shared with the benchmark that prints the README table.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.zoo

HAVE_ZOO = any(importlib.util.find_spec(lib) is not None for lib in ("torchvision", "timm"))


@pytest.fixture(autouse=True)
def _only_when_selected(request):
    markexpr = request.config.getoption("-m") or ""
    if "zoo" not in markexpr or "not zoo" in markexpr:
        pytest.skip("zoo models run only with -m zoo")
    if not HAVE_ZOO:
        pytest.skip("needs torchvision or timm (see benchmarks/zoo.py)")


def _entries():
    if not HAVE_ZOO:
        return [pytest.param(None, id="zoo",
                             marks=pytest.mark.skip(reason="needs torchvision or timm"))]
    from benchmarks.zoo import zoo

    return [pytest.param(e, id=f"{e[0]}.{e[1]}") for e in zoo()]


@pytest.mark.parametrize("entry", _entries())
def test_zoo_model(entry):
    from benchmarks.zoo import run_one

    row = run_one(*entry)
    assert not row.error, row.error
    assert row.parity == 0.0  # preserve mode: a zero gate times a finite tensor adds exactly 0
    assert row.onnx == "yes"
    assert row.candidates <= row.layers * 2  # one per layer or block, never one per pair


# -- issue 24: segmentation models (no mirror pair) and detection backbones (--module) ---------
# Written against torchvision's documented builders; torchvision is not installed in CI, so
# these run only in the zoo venv.

SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
DETECTION = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"]


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_models_keep_parity_and_get_no_mirror_pair(name):
    tv = pytest.importorskip("torchvision")
    import torch

    from ressurgeon import SkipConfig, add_skips, find_spans
    from ressurgeon.verdicts import Reason

    build = getattr(tv.models.segmentation, name)
    model = build(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    assert add_skips(model, (x,), SkipConfig(span=2)).parity.max_abs_diff == 0.0
    # three x2 steps down (x8 with dilation after), one x8 step up: unequal levels
    spans = find_spans(model, (x,), SkipConfig(pattern="mirror"))
    assert spans and not any(s.chosen for s in spans)
    assert Reason.LEVELS in {s.reason for s in spans}


@pytest.mark.parametrize("name", DETECTION)
def test_detection_models_get_shortcuts_in_their_backbone(name):
    tv = pytest.importorskip("torchvision")
    import torch

    from ressurgeon import DeepenConfig, SkipConfig, add_skips, deepen
    from ressurgeon.errors import TraceError

    build = getattr(tv.models.detection, name)
    # untrained RetinaNet scores sit near its prior (0.01), under the default 0.05 threshold:
    # a lower one leaves boxes for the end-to-end comparison to compare
    extra = {"score_thresh": 0.001} if name.startswith("retinanet") else {}
    model = build(weights=None, weights_backbone=None, num_classes=3, **extra).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert len(model(x)[0]["boxes"]) > 0
    with pytest.raises(TraceError, match="--module backbone .*children: .*backbone"):
        add_skips(model, (x,), SkipConfig())
    result = add_skips(model, (x,), SkipConfig(module="backbone"))
    assert type(result.module) is type(model) and result.skips
    assert result.parity.max_abs_diff == 0.0 and result.parity.outputs == 3  # boxes, scores, labels
    assert all(s.name.startswith("backbone.") for s in result.skips)
    assert set(model.state_dict()) <= set(result.module.state_dict())
    # end to end in train mode too: the detection losses reach the new shortcuts
    torch.manual_seed(0)
    losses = result.module.train()([x[0]], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]),
                                             "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    params = dict(result.module.named_parameters())
    for skip in result.skips:  # preserve: the zero gate gets the gradient, S(x) once it moves
        grads = [p.grad for n, p in params.items() if n.startswith(skip.name + ".")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), skip.name
    deeper = deepen(model, (x,), DeepenConfig(module="backbone", blocks=1, how="new"))
    assert type(deeper.module) is type(model)
    assert deeper.new_blocks and all(b.startswith("backbone.") for b in deeper.new_blocks)
    with torch.no_grad():
        before, after = model(x)[0], deeper.module(x)[0]
    assert torch.equal(before["boxes"], after["boxes"])
