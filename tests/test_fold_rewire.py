"""fold on rewired models: blocks whose new parameters are still at init go back to the plain
residual (exactly: the folded graph computes the original model bit for bit); blocks that
trained are kept, with the reason, and the folded model computes what the rewired one does.

The graph path: a plain (non-transformers) model rewired, captured by fold or saved as a .pt2.
A rewired transformers model is refused by fold with one line naming ``unwrap``.
"""

import json

import pytest
import torch

from ressurgeon import RewireConfig, fold, load_model, rewire, save_model
from ressurgeon.errors import ConfigError
from ressurgeon.fold.rewired import find_rewired

from tests.helpers import run_cli
from tests.models import PreNormTransformer

VOCAB = 64
CONFIGS = {
    "dwa": RewireConfig(kind="dwa"),
    "dwa-2x2": RewireConfig(kind="dwa", dilation=2, period=2),
    "hyper-4": RewireConfig(kind="hyper", n=4),
    "hyper-3-dynamic": RewireConfig(kind="hyper", n=3, dynamic=True),
}
NEW = ("weights", "hcs.")   # how the wrappers' new parameters are named


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(depth=4):
    torch.manual_seed(0)
    return PreNormTransformer(vocab=VOCAB, dim=32, heads=4, depth=depth).eval()


def _new_params(module) -> list[str]:
    return [n for n, _ in module.named_parameters()
            if n.rsplit(".", 1)[-1] == "weights" or ".hcs." in n]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_fold_of_a_just_rewired_model_is_the_original_bitwise(config):
    model = _model()
    result = rewire(model, (_ids(),), config)
    folded = fold(result.module, (_ids(),))
    assert [r.name for r in folded.rewired] == result.blocks          # 4 blocks found ...
    assert {r.outcome.value for r in folded.rewired} == {"removed"}   # ... all 4 removed
    assert sum(r.params for r in folded.rewired) == result.params_added
    assert find_rewired(folded.module) == [] and _new_params(folded.module) == []
    with torch.no_grad():
        for seed in (1, 2):
            ids = _ids(seed=seed)
            assert torch.equal(folded.module(ids), model(ids))
    assert folded.ops_after < folded.ops_before


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_after_a_training_step_fold_keeps_the_blocks_that_moved(config):
    model = _model()
    result = rewire(model, (_ids(),), config)
    net = result.module.train()
    opt = torch.optim.SGD(result.new_parameters().values(), lr=0.1)
    ids = _ids()
    torch.nn.functional.cross_entropy(net(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    net.eval()
    moved = [b for b in result.blocks if b not in result.still_at_init()]
    assert moved                                             # the step moved new parameters
    folded = fold(net, (ids,))
    kept = {r.name: r.reason for r in folded.rewired if r.outcome.value == "kept"}
    assert set(moved) <= set(kept) and all(kept.values())
    assert len(find_rewired(folded.module)) == len(kept)
    with torch.no_grad():
        for seed in (1, 3):
            want = net(_ids(seed=seed))
            assert (folded.module(_ids(seed=seed)) - want).abs().max() <= 1e-6


@pytest.mark.parametrize("kind,removed", [("dwa", ["blocks.0", "blocks.1", "blocks.3"]),
                                          ("hyper", ["blocks.0", "blocks.1"])])
def test_only_what_is_still_at_init_and_exact_given_the_others_folds(kind, removed):
    """DWA: each block alone (its average is Y_i whatever the others do); hyper: the blocks
    before the first that moved (after it the n streams differ)."""
    model = _model()
    result = rewire(model, (_ids(),), RewireConfig(kind=kind))
    with torch.no_grad():
        for _, p in result.wrappers[2].new_parameters():
            p.add_(0.01)
    folded = fold(result.module, (_ids(),))
    assert [r.name for r in folded.rewired if r.outcome.value == "removed"] == removed
    reasons = {r.name: r.reason for r in folded.rewired if r.outcome.value == "kept"}
    assert "moved" in reasons["blocks.2"]
    if kind == "hyper":
        assert "streams differ" in reasons["blocks.3"]
    with torch.no_grad():
        assert (folded.module(_ids()) - result.module(_ids())).abs().max() <= 1e-6


def test_mhc_is_kept_with_its_reason():
    result = rewire(_model(2), (_ids(),), RewireConfig(kind="hyper", mhc=True))
    folded = fold(result.module, (_ids(),))
    assert [r.outcome.value for r in folded.rewired] == ["kept", "kept"]
    assert all("Sinkhorn" in r.reason for r in folded.rewired)
    assert folded.max_abs_diff <= 1e-6


def test_a_rewired_transformers_model_is_refused_naming_unwrap():
    pytest.importorskip("transformers")
    from tests.models import tiny_llama_lm

    result = rewire(tiny_llama_lm(), (_ids(),), RewireConfig(kind="dwa"))
    with pytest.raises(ConfigError, match=r"unwrap"):
        fold(result.module, (_ids(),))
    assert type(result.unwrap()) is type(result.module)   # what the message points to


def test_cli_fold_on_a_rewired_pt2(tmp_path):
    model = _model()
    ids = _ids()
    result = rewire(model, (ids,), RewireConfig(kind="hyper", n=4))
    src = save_model(result.module, tmp_path / "rewired.pt2", (ids,))
    assert len(find_rewired(load_model(src))) == 4           # the archive names the wrappers
    done = run_cli("fold", src, "-i", "2,9:int64", "--vocab", VOCAB, "-o",
                   tmp_path / "plain.pt2", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert [r["outcome"] for r in report["rewired"]] == ["removed"] * 4
    assert report["max_abs_diff"] == 0.0
    back = load_model(tmp_path / "plain.pt2")
    assert find_rewired(back) == [] and _new_params(back) == []
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_onnx_export_of_a_folded_and_an_unfolded_rewired_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from ressurgeon import export_onnx, trace_model

    ids = _ids()
    result = rewire(_model(2), (ids,), RewireConfig(kind="dwa"))
    with torch.no_grad():   # one block trained, one at init: fold keeps one, removes one
        result.wrappers[1].weights.add_(0.05)
    unfolded = trace_model(result.module, (ids,))
    folded = fold(unfolded, (ids,))
    assert [r.outcome.value for r in folded.rewired] == ["removed", "kept"]
    for name, net in (("unfolded", unfolded), ("folded", folded.module)):
        report = export_onnx(net, tmp_path / f"{name}.onnx", (ids,))
        assert report.checker_passed and report.parity, name
        assert report.max_abs_diff <= 1e-5, (name, report.parity)
