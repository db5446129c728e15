"""Diagnostics: gradient flow before/after surgery, gate reports, figures, and their commands."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli as run, with_gates
from models import deep_mlp, mlp_changing_widths, plain_cnn
from ressurgeon import SkipConfig, add_skips, find_layers, select_spans, trace_model
from ressurgeon.diagnose import gradient_flow
from ressurgeon.gates import gate_report
from ressurgeon.errors import ConfigError, ExportError
from ressurgeon.save import save_model
from ressurgeon.load import load_model

PNG = b"\x89PNG\r\n\x1a\n"


# -- gradient_flow -------------------------------------------------------------------

def test_standard_surgery_lifts_the_first_layers_gradient():
    model = deep_mlp(20)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    report = gradient_flow(model, (x,), SkipConfig(span=2, init="standard"))
    first = report.layers[0]
    assert first.layer == "0" and first.weight == "0.weight"
    assert first.original.grad_norm > 0
    assert first.rewritten.grad_norm >= 10 * first.original.grad_norm
    assert report.first_gain == pytest.approx(first.gain)
    assert report.skips == 9 and report.init == "standard"
    assert [r.skip for r in report.layers if r.skip][0] == "skip_0__4"
    json.dumps(report.to_dict())  # plain data all the way down


def test_preserve_leaves_the_first_gradients_exactly_as_they_were():
    # gate 0: h + 0*S(x) passes h's gradient through unchanged
    report = gradient_flow(deep_mlp(8), (torch.randn(8, 32),), SkipConfig(init="preserve"))
    assert report.skips > 0
    for row in report.layers:
        assert row.rewritten.grad_norm == pytest.approx(row.original.grad_norm, rel=1e-6)
        assert row.rewritten.act_std == pytest.approx(row.original.act_std, rel=1e-6)


def test_gradient_flow_is_reproducible_and_leaves_the_model_alone():
    model = plain_cnn().train()  # BatchNorm in train mode would update its running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    a = gradient_flow(model, (x,))
    b = gradient_flow(model, (x,))
    assert a.to_dict() == b.to_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_user_loss_and_a_reloaded_pt2_give_the_same_rows(tmp_path):
    torch.manual_seed(0)
    model = mlp_changing_widths()
    x, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 0, 1, 2])
    result = with_gates(add_skips(model, (x,), SkipConfig(init="rezero")), [0.5, -0.25, 0.75])
    save_model(result.module, tmp_path / "r.pt2", (x,))
    in_memory = gradient_flow(model, (x,), rewritten=result, loss_fn=F.cross_entropy, target=y)
    reloaded = gradient_flow(model, (x,), rewritten=load_model(tmp_path / "r.pt2"),
                             loss_fn=F.cross_entropy, target=y)
    assert reloaded.init == "rezero"
    for a, b in zip(in_memory.layers, reloaded.layers, strict=True):
        assert b.rewritten.grad_norm == pytest.approx(a.rewritten.grad_norm, rel=1e-5)
        assert b.rewritten.act_std == pytest.approx(a.rewritten.act_std, rel=1e-5)
        assert a.skip == b.skip


def test_a_loss_that_is_no_scalar_is_a_config_error():
    with pytest.raises(ConfigError, match="scalar"):
        gradient_flow(deep_mlp(4), (torch.randn(4, 32),), loss_fn=lambda out, t: out)
    with pytest.raises(ConfigError, match="loss_fn failed"):
        gradient_flow(deep_mlp(4), (torch.randn(4, 32),), loss_fn=lambda out, t: out[99])


# -- gate_report ---------------------------------------------------------------------

@pytest.mark.parametrize("init", ["preserve", "rezero"])
def test_gate_report_reads_trained_gates_from_module_pt2_and_state_dict(init, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    result = with_gates(add_skips(mlp_changing_widths(), (x,), SkipConfig(init=init)),
                        [0.5, -0.25, 0.125])
    expected = [(s.name, s.source_layer, s.target_layer, s.kind) for s in result.skips]

    live = gate_report(result.module)
    assert [(g.name, g.source_layer, g.target_layer, g.kind) for g in live.gates] == expected
    assert [g.value for g in live.gates] == [0.5, -0.25, 0.125]
    assert {g.init for g in live.gates} == {init} and not live.flattened

    save_model(result.module, tmp_path / "m.pt2", (x,))
    # torch.export inlines the Shortcut modules; load_model lifts them back, and a raw
    # ep.module() is read through the same recogniser
    loaded = gate_report(load_model(tmp_path / "m.pt2"))
    assert not loaded.flattened and loaded.to_dict()["gates"] == live.to_dict()["gates"]
    flat = gate_report(torch.export.load(tmp_path / "m.pt2").module())
    assert flat.flattened and flat.to_dict()["gates"] == live.to_dict()["gates"]

    weights = gate_report(result.module.state_dict())
    assert [g.value for g in weights.gates] == [0.5, -0.25, 0.125]
    assert {g.init for g in weights.gates} == {None}  # not recorded in a state_dict


def test_gate_report_lists_standard_shortcuts_without_a_value(tmp_path):
    x = torch.randn(4, 12)
    result = add_skips(mlp_changing_widths(), (x,), SkipConfig(init="standard"))
    report = gate_report(result.module)
    assert len(report.gates) == len(result.skips) and report.values == {}
    assert all(g.value is None and g.init == "standard" for g in report.gates)
    save_model(result.module, tmp_path / "s.pt2", (x,))
    flat = gate_report(load_model(tmp_path / "s.pt2"))
    assert [(g.name, g.init, g.kind) for g in flat.gates] == [
        (g.name, g.init, g.kind) for g in report.gates]
    assert gate_report(deep_mlp(4)).gates == ()  # a plain model has none


# -- figures -------------------------------------------------------------------------

def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ressurgeon.plot import plot_gradient_flow, plot_surgery

    x = torch.randn(8, 32)
    report = gradient_flow(deep_mlp(10), (x,))
    assert plot_gradient_flow(report, tmp_path / "g.png").read_bytes().startswith(PNG)

    model = plain_cnn()
    gm = trace_model(model, (torch.randn(2, 3, 16, 16),))
    spans = select_spans(gm, SkipConfig())
    assert any(not s.chosen for s in spans)
    out = plot_surgery(find_layers(gm), spans, tmp_path / "s.png", show_rejected=True)
    assert out.read_bytes().startswith(PNG)

    result = with_gates(add_skips(model, (torch.randn(2, 3, 16, 16),)), [0.3, -0.1])
    out = plot_surgery(find_layers(result.module), result.skips, tmp_path / "gates.svg",
                       gates=gate_report(result.module))
    assert b"<svg" in out.read_bytes()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "gates.svg", "s.png"]


def test_plot_errors_are_ressurgeon_errors(tmp_path):
    pytest.importorskip("matplotlib")
    from ressurgeon.plot import plot_surgery

    result = add_skips(deep_mlp(4), (torch.randn(2, 32),))
    with pytest.raises(ConfigError, match="not in the layer list"):
        plot_surgery(["0", "2"], result.skips, tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        plot_surgery(None, result.skips, tmp_path / "a.xyz")
    with pytest.raises(ExportError, match="does not exist"):
        plot_surgery(None, result.skips, tmp_path / "missing" / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from ressurgeon.plot import plot_surgery

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    result = add_skips(deep_mlp(4), (torch.randn(2, 32),))
    with pytest.raises(ConfigError, match=r"pip install 'ressurgeon\[plot\]'"):
        plot_surgery(None, result.skips, tmp_path / "a.png")


def test_importing_ressurgeon_does_not_import_matplotlib():
    code = ("import sys, ressurgeon, ressurgeon.diagnose, ressurgeon.plot, ressurgeon.cli.diagnose;"
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# -- commands ------------------------------------------------------------------------

def test_diagnose_table_json_and_plot(example_models, tmp_path):
    result = run("diagnose", example_models["mlp"], "-i", "8,64")
    assert result.exit_code == 0, result.output
    assert "Gradient flow" in result.stdout and "first layer's gradient" in result.stdout

    plot = tmp_path / "grad.png"
    result = run("diagnose", example_models["mlp"], "-i", "8,64", "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["init"] == "standard" and report["skips"] == 3
    assert len(report["layers"]) == 9 and report["first_gain"] > 1
    assert report["plot"] == str(plot) and plot.read_bytes().startswith(PNG)


def test_diagnose_against_a_rewritten_file(example_models, tmp_path):
    out = tmp_path / "m.pt2"
    assert run("add-skips", example_models["mlp"], "-o", out, "--init", "rezero",
               "--quiet").exit_code == 0
    result = run("diagnose", example_models["mlp"], "--rewritten", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["init"] == "rezero" and report["config"] is None
    assert all(row["rewritten"]["grad_norm"] is not None for row in report["layers"])


def test_diagnose_bad_shape_is_one_line(example_models):
    result = run("diagnose", example_models["mlp"], "-i", "8,65")
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output


def test_gates_command_on_pt2_state_dict_and_plain(example_models, tmp_path):
    x = torch.randn(4, 64)
    plain = load_model(example_models["mlp"])
    result = with_gates(add_skips(plain, (x,), SkipConfig(init="preserve")), [0.5, -0.2, 0.1])
    save_model(result.module, tmp_path / "tuned.pt2", (x,))
    torch.save(result.module.state_dict(), tmp_path / "tuned.pt")

    table = run("gates", tmp_path / "tuned.pt2")
    assert table.exit_code == 0, table.output
    assert "Shortcut gates" in table.stdout and "+0.5000" in table.stdout
    assert "h + a*S(x)" in table.stdout

    report = json.loads(run("gates", tmp_path / "tuned.pt2", "--json").stdout)
    assert [g["value"] for g in report["gates"]] == pytest.approx([0.5, -0.2, 0.1])
    assert {g["init"] for g in report["gates"]} == {"preserve"}

    weights = run("gates", tmp_path / "tuned.pt")  # a state_dict: no --arch needed
    assert weights.exit_code == 0 and "init cannot be told" in weights.stderr

    none = run("gates", example_models["mlp"])
    assert none.exit_code == 0 and "no ressurgeon shortcut" in none.stderr


def test_gates_plot(example_models, tmp_path):
    pytest.importorskip("matplotlib")
    x = torch.randn(4, 64)
    result = with_gates(add_skips(load_model(example_models["mlp"]), (x,),
                                  SkipConfig(init="rezero")), [0.5, -0.2, 0.1])
    save_model(result.module, tmp_path / "tuned.pt2", (x,))
    torch.save(result.module.state_dict(), tmp_path / "tuned.pt")
    plot = tmp_path / "gates.png"
    assert run("gates", tmp_path / "tuned.pt2", "--plot", plot, "-q").exit_code == 0
    assert plot.read_bytes().startswith(PNG)
    refused = run("gates", tmp_path / "tuned.pt", "--plot", tmp_path / "w.png")
    assert refused.exit_code == 2 and "holds weights only" in refused.stderr


@pytest.mark.parametrize("command", ["diagnose", "gates"])
def test_help_has_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout
