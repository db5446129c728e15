"""A captured graph computes what the original computes or raises, naming the dim and the bound.

torch.export records each dynamic dim's range (``Dim(min=, max=)`` and what the model's
code implied) and the branches it took on sizes as guards; every capture ressurgeon makes
or loads checks both on every call, and a .pt2 it writes keeps them.
"""

import json
import re

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

from helpers import one_line_error, run_cli as run
from ressurgeon import TraceOptions, add_skips, load_model, save_model
from ressurgeon.errors import ConfigError, ShapeError
from ressurgeon.save import FixedDimsWarning

PARITY = 1e-6  # float32: the loaded graph runs the original's ops


def _stack(width=6, depth=5):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Centred(nn.Module):
    """Plain layers that centre by the mean along ``axis`` above size 4 there (a size branch)."""

    def __init__(self, axis=0):
        super().__init__()
        self.axis, self.body = axis, _stack()

    def forward(self, x):
        y = self.body(x)
        if x.shape[self.axis] > 4:
            y = y - y.mean(self.axis, keepdim=True)
        return y


class EvenLength(nn.Module):
    """Doubles its output for even lengths: export records that branch as a guard."""

    def __init__(self):
        super().__init__()
        self.body = _stack()

    def forward(self, x):
        y = self.body(x)
        if x.shape[1] % 2 == 0:
            y = y * 2
        return y


def _archive(tmp_path, model, x, shapes, name="m.pt2"):
    torch.manual_seed(0)
    path = tmp_path / name
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes,
                                          strict=False), path)
    return path


def test_a_loaded_archive_checks_both_bounds_of_a_dim(tmp_path):
    model = Centred().eval()
    path = _archive(tmp_path, model, torch.randn(8, 6), ({0: Dim("batch", min=5, max=64)},))
    loaded = load_model(path)
    for batch in (5, 8, 64):
        x = torch.randn(batch, 6)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=PARITY)
    with pytest.raises(ShapeError, match=r"size 2 at dim 0.*sizes 5 to 64.*lower bound is 5"):
        loaded(torch.randn(2, 6))  # main returned numbers off by the batch mean here
    with pytest.raises(ShapeError, match=r"size 65 at dim 0.*upper bound is 64"):
        loaded(torch.randn(65, 6))


def test_guards_torch_export_recorded_are_checked(tmp_path):
    model = EvenLength().eval()
    path = _archive(tmp_path, model, torch.randn(2, 4, 6), ({1: Dim.DYNAMIC},))
    loaded = load_model(path)
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=PARITY)
    with pytest.raises(ShapeError, match=r"shape \(2, 5, 6\).*x\.shape\[1\] % 2\) == 0"):
        loaded(torch.randn(2, 5, 6))  # the other branch: main returned twice the output


def test_a_guard_that_is_not_size_arithmetic_is_refused_not_run():
    from ressurgeon.capture.bounds import parse_guard

    assert parse_guard("(L['x'].size()[2] % 2) == 0")[0] == "cmp"
    for text in ("__import__('os').system('true')", "L['x'].stride()[0] == 1",
                 "L['x'].size()[0] == " + "+".join(["1"] * 500), "x" * 3000):
        with pytest.raises(ShapeError):
            parse_guard(text)


def test_the_written_archive_keeps_the_range_it_read(tmp_path):
    model = Centred().eval()
    path = _archive(tmp_path, model, torch.randn(8, 6), ({0: Dim("batch", min=5, max=64)},))
    x = torch.randn(8, 6)
    with_skips = add_skips(load_model(path), (x,))
    assert with_skips.skips
    out = tmp_path / "skips.pt2"
    save_model(with_skips.module, out, (x,))
    ranges = torch.export.load(out).range_constraints
    assert sorted((int(r.lower), int(r.upper)) for r in ranges.values()) == [(5, 64)]
    plain = torch.export.load(out).module()  # torch's own reader refuses batch 2 too
    with pytest.raises(Exception, match=r">= 5"):
        plain(torch.randn(2, 6))
    with pytest.raises(ShapeError, match="lower bound is 5"):
        load_model(out)(torch.randn(2, 6))
    x = torch.randn(33, 6)
    torch.testing.assert_close(load_model(out)(x), model(x), rtol=0, atol=PARITY)


def test_a_sequence_range_survives_add_skips_dynamic(tmp_path):
    model = Centred(axis=1).eval()
    path = _archive(tmp_path, model, torch.randn(2, 6, 6), ({1: Dim("seq", min=5)},))
    x = torch.randn(2, 6, 6)
    result = add_skips(load_model(path), (x,), trace=TraceOptions(dynamic=(1,)))
    out = tmp_path / "skips.pt2"
    save_model(result.module, out, (x,), dynamic=((0, 1),))
    reloaded = load_model(out)
    with pytest.raises(ShapeError, match="size 4 at dim 1.*lower bound is 5"):
        reloaded(torch.randn(2, 4, 6))
    plain = torch.export.load(out).module()  # main's archive accepted length 3 here
    with pytest.raises(Exception, match=r">= 5"):
        plain(torch.randn(2, 3, 6))
    x = torch.randn(2, 9, 6)  # the archive fixed the batch at 2, the length is free from 5
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=PARITY)


class PinnedLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.body = nn.Linear(8 * 6, 6), _stack()

    def forward(self, x):
        return self.body(torch.relu(self.a(x.reshape(x.shape[0], 8 * 6))))


def test_a_fall_back_to_a_fixed_size_is_a_warning(tmp_path):
    model = PinnedLength().eval()
    x = torch.randn(2, 8, 6)
    result = add_skips(model, (x,))
    with pytest.warns(FixedDimsWarning, match=r"input 0 dim 1 at 8") as caught:
        save_model(result.module, tmp_path / "p.pt2", (x,), dynamic=((0, 1),))
    assert [w.message.dims for w in caught] == [((0, 1, 8),)]


def test_dynamic_dims_that_do_not_exist_are_refused():
    x = torch.randn(2, 8, 6)
    with pytest.raises(ConfigError, match="no input has dim 99"):
        add_skips(EvenLength().eval(), (x,), trace=TraceOptions(dynamic=(99,)))
    with pytest.raises(ConfigError, match="input 0 has no dim 99"):
        add_skips(EvenLength().eval(), (x,), trace=TraceOptions(dynamic=((0, 99),)))
    with pytest.raises(ConfigError, match="there is no input 3"):
        add_skips(EvenLength().eval(), (x,), trace=TraceOptions(dynamic=((3, 1),)))


def test_cli_refuses_unknown_and_statically_exported_dims(tmp_path):
    static = _archive(tmp_path, EvenLength(), torch.randn(2, 8, 6), None)
    for flag, says in (("99", "no input has dim 99"), ("0:99", "input 0 has no dim 99"),
                       ("1", "fixed at size 8.*export the model again")):
        result = run("add-skips", static, "--dynamic", flag, "-o", tmp_path / "o.pt2")
        line = one_line_error(result)
        assert re.search(says, line), line
        assert "--dynamic 0:1" not in line


def test_cli_reports_a_fixed_size_in_json_and_on_stderr(tmp_path):
    path = tmp_path / "pinned.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.ReLU(), _stack()), path)
    result = run("add-skips", path, "-i", "2,8,6", "--dynamic", "0:1", "-o",
                 tmp_path / "o.pt2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fixed_dims"] == [{"input": 0, "dim": 1, "size": 8}]
    result = run("add-skips", path, "-i", "2,8,6", "--dynamic", "0:1", "-o", tmp_path / "o.pt2")
    assert result.exit_code == 0, result.output
    assert "accepts only the example's size for input 0 dim 1 at 8" in result.stderr


def test_cli_keeps_the_batch_range_of_its_input(tmp_path):
    path = _archive(tmp_path, Centred(), torch.randn(8, 6), ({0: Dim("batch", min=5, max=1024)},))
    out = tmp_path / "o.pt2"
    result = run("add-skips", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fixed_dims"] == []
    ranges = torch.export.load(out).range_constraints
    assert sorted((int(r.lower), int(r.upper)) for r in ranges.values()) == [(5, 1024)]


class ShortRefused(nn.Module):
    """Refuses sequences shorter than 5 in its own code: fx cannot trace that branch."""

    def __init__(self):
        super().__init__()
        self.body = _stack()

    def forward(self, x):
        if x.shape[1] < 5:
            raise ValueError("sequence too short")
        return self.body(x)


def test_the_export_fallback_of_add_skips_checks_the_range_it_inferred(tmp_path):
    model = ShortRefused().eval()
    x = torch.randn(2, 8, 6)
    result = add_skips(model, (x,), trace=TraceOptions(dynamic=(1,)))
    assert result.method == "export" and result.skips
    with pytest.raises(ShapeError, match="size 3 at dim 1.*lower bound is 5"):
        result.module(torch.randn(2, 3, 6))  # main returned numbers where the original raises
    x = torch.randn(3, 11, 6)
    torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=PARITY)
    path = tmp_path / "r.pt"  # a pickled GraphModule keeps its checks
    save_model(result.module, path, (x,))
    with pytest.raises(ShapeError, match="lower bound is 5"):
        torch.load(path, weights_only=False)(torch.randn(2, 3, 6))
