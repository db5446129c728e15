"""The command line, through typer's CliRunner and one real subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import gates_after_rewrite, one_line_error, run_cli as run


def test_add_skips_writes_a_pt2_that_matches_the_original(example_models, tmp_path):
    out = tmp_path / "vgg_skips.pt2"
    result = run("add-skips", example_models["vgg"], "-i", "2,3,32,32", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Shortcuts inserted" in result.stdout and "total" in result.stdout
    assert "outputs unchanged" in result.stderr
    rewritten = torch.export.load(out).module()
    original = torch.export.load(example_models["vgg"]).module()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rewritten(x), original(x), rtol=0, atol=1e-6)
    x5 = torch.randn(5, 3, 32, 32)  # the archive has a dynamic batch
    assert rewritten(x5).shape == (5, 10)


def test_add_skips_json_report(example_models, tmp_path):
    result = run("add-skips", example_models["mlp"], "-o", tmp_path / "m.pt2", "--json",
                 "--init", "standard", "--span", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["init"] == "standard"
    assert [s["kind"] for s in report["skips"]] == ["identity", "projection", "identity"]
    assert report["params_added"] == sum(s["params"] for s in report["skips"]) == 128 * 64
    assert report["parity"]["max_abs_diff"] > 0
    assert report["output"].endswith("m.pt2")


def test_plan_out_then_plan(example_models, tmp_path):
    plan = tmp_path / "plan.json"
    result = run("add-skips", example_models["mlp"], "--dry-run", "--plan-out", plan)
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("*.pt2"))  # dry run writes no model
    data = json.loads(plan.read_text())
    data["skips"] = data["skips"][1:]
    plan.write_text(json.dumps(data))
    result = run("add-skips", example_models["mlp"], "--plan", plan, "-o", tmp_path / "o.pt2",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["skips"]) == 2
    # the report describes the plan: the dropped shortcut is rejected as left out of it
    assert [r["reason"] for r in report["rejected"]].count("not-in-plan") == 1


def test_inspect_lists_chosen_and_rejected(example_models):
    result = run("inspect", example_models["vgg"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    verdicts = {s["reason"] for s in report["spans"]}
    assert None in verdicts and "overlaps" in verdicts and "head" in verdicts
    assert len(report["layers"]) == 9


@pytest.mark.parametrize("args,needle", [
    (["--input-shape", "1,3,x"], "is not a shape"),
    (["--input-shape", "1,5,32,32"], "rejected input of shape (1, 5, 32, 32)"),
    (["--span", "0"], "span must be an integer >= 1"),
    (["--init", "zero"], "init must be one of"),
    (["--dtype", "int8"], "--dtype 'int8' is not supported"),
])
def test_bad_flags_exit_2_with_one_line(example_models, tmp_path, args, needle):
    out = tmp_path / "o.pt2"
    result = run("add-skips", example_models["vgg"], "-o", out, *args)
    assert needle in one_line_error(result)
    assert not out.exists()


def test_missing_file_and_output_rules(example_models, tmp_path):
    assert "no such file" in one_line_error(run("add-skips", tmp_path / "nope.pt2"))
    copy = tmp_path / "in.pt2"
    shutil.copy(example_models["mlp"], copy)
    before = copy.read_bytes()
    assert "never overwrites its input" in one_line_error(run("add-skips", copy, "-o", copy))
    assert copy.read_bytes() == before
    msg = one_line_error(run("add-skips", copy, "-o", tmp_path / "missing" / "o.pt2"))
    assert "does not exist" in msg


def test_corrupted_archive_is_one_line(example_models, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(example_models["vgg"].read_bytes()[:5000])
    result = run("add-skips", bad, "-o", tmp_path / "o.pt2")
    assert "truncated or corrupted" in one_line_error(result)
    assert not (tmp_path / "o.pt2").exists()


def test_no_candidates_is_not_an_error(tmp_path):
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(2, 4),)), path)
    result = run("add-skips", path, "-o", tmp_path / "o.pt2")
    assert result.exit_code == 0
    # written unchanged, so that a pipeline's next step works (tests/test_defaults.py)
    assert "no shortcut inserted" in result.stderr and (tmp_path / "o.pt2").exists()


def test_console_script_runs_in_a_real_process(example_models, tmp_path):
    exe = Path(sys.executable).with_name("ressurgeon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ressurgeon"]
    out = tmp_path / "v.pt2"
    proc = subprocess.run([*cmd, "add-skips", str(example_models["vgg"]), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skips"] and out.exists()
    proc = subprocess.run([*cmd, "add-skips", str(tmp_path / "none.pt2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no such file")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["add-skips", "inspect"])
def test_every_command_has_help_with_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout


def test_several_inputs_and_dtype(tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential(*[m for _ in range(4) for m in
                                           (torch.nn.Linear(6, 6), torch.nn.ReLU())])
            self.b = torch.nn.Linear(4, 6)

        def forward(self, a, b):
            return self.a(a) * self.b(b)

    path = tmp_path / "two.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(TwoInputs().eval(), (torch.randn(2, 6),
                                                               torch.randn(2, 4)),
                                          dynamic_shapes=({0: batch}, {0: batch})), path)
    result = run("add-skips", path, "-i", "3,6", "-i", "3,4", "--dtype", "float64",
                 "-o", tmp_path / "o.pt2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skips"][0]["src_shape"] == [3, 6]
    assert report["parity"]["tolerance"] == 1e-12  # the float64 entry of the table
    assert len(torch.export.load(tmp_path / "o.pt2").module().graph.find_nodes(
        op="placeholder")) == 2


def test_cuda_request_without_gpu_is_a_usage_error(example_models):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA GPU" in one_line_error(run("inspect", example_models["mlp"], "--device", "cuda"))


def test_shell_completion_is_offered():
    assert "--install-completion" in run("--help").stdout


def test_add_skips_with_onnx(example_models, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    result = run("add-skips", example_models["mlp"], "-o", tmp_path / "m.pt2", "--onnx",
                 onnx_path, "--init", "standard", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["onnx"]
    assert report["checker_passed"] and report["parity_checked"]
    assert len(report["parity"]) == 2 and report["max_abs_diff"] <= report["tolerance"]
    assert onnx_path.exists()


def test_plot_flags_write_pngs(example_models, tmp_path):
    pytest.importorskip("matplotlib")
    result = run("inspect", example_models["vgg"], "--plot", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    result = run("add-skips", example_models["vgg"], "-o", tmp_path / "o.pt2",
                 "--plot", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    for name in ("s.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fake_shapes_and_concrete_args(example_models, tmp_path):
    result = run("add-skips", example_models["mlp"], "-o", tmp_path / "o.pt2", "--fake",
                 "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parity"] is None and len(report["skips"]) == 3
    msg = one_line_error(run("add-skips", example_models["mlp"], "--concrete", "mode=1"))
    assert "not parameters of" in msg
    assert "NAME=VALUE" in one_line_error(run("inspect", example_models["mlp"], "--concrete", "x"))


def test_inspect_reports_existing_residuals(tmp_path):
    from models import ARCHITECTURES

    builder, shapes = ARCHITECTURES["resnet"]
    model = builder().eval()
    path = tmp_path / "resnet.pt2"
    torch.export.save(torch.export.export(model, tuple(torch.randn(s) for s in shapes)), path)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["existing_residuals"]
    assert not [s for s in report["spans"] if s["chosen"]]
    assert {s["reason"] for s in report["spans"]} >= {"existing-residual"}


def test_save_code_never_deletes_a_users_folder(example_models, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    model = keep / "vgg.pt2"
    shutil.copy(example_models["vgg"], model)
    (keep / "notes.txt").write_text("mine")
    msg = one_line_error(run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", keep))
    assert "holds the input" in msg
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    msg = one_line_error(run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", other))
    assert "not a folder ressurgeon wrote" in msg
    assert (other / "notes.txt").read_text() == "mine" and model.exists()
    code = tmp_path / "code"
    for _ in range(2):  # written again: only the files it wrote are replaced
        result = run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", code)
        assert result.exit_code == 0, result.output
        (code / "mine.txt").write_text("mine")
    assert (code / "module.py").exists() and (code / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,needle", [
    (["-o", "{tmp}"], "is a folder"),
    (["-o", "{tmp}/m.h5"], "cannot tell the format"),
    (["-o", "{tmp}/a.pt2", "--onnx", "{tmp}/a.pt2"], "both name"),
    (["-o", "{tmp}/a.pt2", "--plan", "{tmp}/p.json", "--plan-out", "{tmp}/p.json"],
     "is one of the inputs"),
])
def test_output_paths_are_checked_before_any_work(example_models, tmp_path, flags, needle):
    (tmp_path / "p.json").write_text("{}")
    args = [f.format(tmp=tmp_path) for f in flags]
    assert needle in one_line_error(run("add-skips", example_models["mlp"], *args))
    assert (tmp_path / "p.json").read_text() == "{}"
    assert not list(tmp_path.glob("*.pt2"))


def test_wrong_number_of_inputs_and_bad_plan_shapes(example_models, tmp_path):
    msg = one_line_error(run("add-skips", example_models["vgg"], "-i", "1,3,32,32", "-i", "1,3"))
    assert "takes 1 tensor input(s)" in msg and "2 example input(s)" in msg
    plan = tmp_path / "p.json"
    run("add-skips", example_models["mlp"], "--dry-run", "--plan-out", plan)
    data = json.loads(plan.read_text())
    data["input_shapes"] = [[0, "a"]]
    plan.write_text(json.dumps(data))
    assert "input_shapes" in one_line_error(run("add-skips", example_models["mlp"], "--plan", plan))


def test_a_rewritten_archive_is_recognised_on_a_second_pass(example_models, tmp_path):
    first = tmp_path / "once.pt2"
    assert run("add-skips", example_models["vgg"], "-o", first).exit_code == 0
    report = json.loads(run("inspect", first, "--json").stdout)
    original = json.loads(run("inspect", example_models["vgg"], "--json").stdout)
    # the inlined projections are part of our shortcuts, not layers of the model
    assert [lay["name"] for lay in report["layers"]] == [lay["name"] for lay in original["layers"]]
    assert len(report["existing_residuals"]) == 3
    result = run("add-skips", first, "-o", tmp_path / "twice.pt2")
    assert result.exit_code == 0 and "no shortcut inserted" in result.stderr


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("ressurgeon 0.1.0 (torch ")


def test_token_id_inputs_take_the_dtype_the_archive_recorded(tmp_path):
    from models import TokenStack

    model, ids = TokenStack().eval(), torch.randint(0, 50, (2, 8))
    path = tmp_path / "tok.pt2"
    torch.export.save(torch.export.export(model, (ids,)), path)
    result = run("add-skips", path, "-o", tmp_path / "o.pt2", "--json")  # int64 from the archive
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"]["max_abs_diff"] == 0
    result = run("add-skips", path, "-i", "2,8:int64", "--vocab", "10", "--dry-run")
    assert result.exit_code == 0, result.output
    line = one_line_error(run("add-skips", path, "-i", "2,8", "--dry-run"))
    assert "2,8:int64" in line
    assert "is not a dtype" in one_line_error(run("add-skips", path, "-i", "2,8:int7"))


def test_dynamic_flag_keeps_the_sequence_dim_of_a_capture(tmp_path):
    from models import PosMLP

    model = PosMLP().eval()
    path = tmp_path / "pos.pt"
    torch.save(model, path)  # torch.nn-only? no: PosMLP is our class, so --trust-pickle
    out = tmp_path / "o.pt2"
    result = run("add-skips", path, "-i", "2,8,16", "--dynamic", "1", "--trust-pickle", "-o", out)
    assert result.exit_code == 0, result.output
    reloaded = torch.export.load(out).module()
    for length in (1, 3, 8):
        x = torch.randn(2, length, 16)
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-6)
    assert "INPUT:DIM" in one_line_error(run("add-skips", path, "--dynamic", "x", "-i", "2,8,16"))


def test_a_preserve_rewrite_that_changes_the_outputs_exits_3(example_models, tmp_path,
                                                             monkeypatch):
    # A rewrite bug simulated: the gates start at 0.5 instead of 0, so the real parity check
    # measures a difference; the CLI must then exit 3 (failed verification) and write nothing.
    gates_after_rewrite(monkeypatch, 0.5)
    out = tmp_path / "o.pt2"
    line = one_line_error(run("add-skips", example_models["mlp"], "-o", out), code=3)
    assert "init 'preserve' changed the outputs by" in line and "tolerance 1e-06" in line, line
    assert not out.exists()
    # with init standard the same difference is expected: exit 0
    assert run("add-skips", example_models["mlp"], "-o", out, "--init", "standard").exit_code == 0
