"""Bad and hostile input against every command: each is refused with exit 2 and one line,
writes nothing at the final name, deletes nothing, and leaves the input as it was.

The bulk runs in-process (typer's CliRunner); a few cases need a real process
(a file-size limit, a killed run). Loader attacks (crafted archives and
pickles) are in test_security.py.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import one_line_error, run_cli as run
from models import mlp_changing_widths

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp(tmp_path, example_models):
    """A private copy of the example MLP archive, and its digest."""
    path = tmp_path / "in" / "mlp.pt2"
    path.parent.mkdir()
    path.write_bytes(example_models["mlp"].read_bytes())
    return path, digest(path)


def refused(result, model, before, *forbidden: Path) -> str:
    line = one_line_error(result)
    assert digest(model) == before, "the input changed"
    for path in forbidden:
        assert not path.exists(), f"{path} was written"
    return line


# -- bad values of flags: exit 2, one line --------------------------------------------------------

@pytest.mark.parametrize("flags,needle", [
    (["-i", "4²,16"], "is not a shape"),
    (["-i", "99999999999999999999,16"], "is not a shape"),
    (["-i", "0,16"], "is not a shape"),
    (["-i", "1,3,20000,20000"], "GiB of example input"),
    (["--span", "0"], "span must be"),
    (["--init", "bogus"], "init must be one of"),
    (["--opset", "-1", "--onnx", "{tmp}/m.onnx"], "opset"),
    (["--device", "meta"], "--fake"),
    (["--device", "mps"], "mps"),
    (["--device", "cuda:7"], "cuda"),
    (["--dtype", "int3"], "--dtype"),
    (["--concrete", "x"], "NAME=VALUE"),
])
def test_bad_flag_values(mlp, tmp_path, flags, needle):
    model, before = mlp
    args = [f.format(tmp=tmp_path) for f in flags]
    line = refused(run("add-skips", model, "-o", tmp_path / "o.pt2", *args), model, before,
                   tmp_path / "o.pt2", tmp_path / "m.onnx")
    assert needle in line


def test_a_huge_span_is_bounded_by_the_layers(mlp, tmp_path):
    model, _ = mlp
    start = time.perf_counter()
    result = run("add-skips", model, "--span", "2000000000", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skips"] == [] and time.perf_counter() - start < 60


# -- plans ----------------------------------------------------------------------------------------

PLANS = {
    "not-json": b"{",
    "not-utf8": b"\xff\xfe{}",
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "config-null": json.dumps({"config": None, "skips": []}).encode(),
    "skips-not-list": json.dumps({"config": {}, "skips": 3}).encode(),
    "skip-not-object": json.dumps({"config": {}, "skips": [3]}).encode(),
    "source-not-string": json.dumps({"config": {}, "skips": [
        {"source": 1, "target": "x", "kind": "identity"}]}).encode(),
    "stride-huge": json.dumps({"config": {}, "skips": [
        {"source": "a", "target": "b", "kind": "projection", "stride": 10 ** 30}]}).encode(),
    "include-int": json.dumps({"config": {"include": 3}, "skips": []}).encode(),
    "unknown-field": json.dumps({"config": {"spam": 1}, "skips": []}).encode(),
    "bad-shapes": json.dumps({"config": {}, "skips": [], "input_shapes": [[0]]}).encode(),
    "unknown-node": json.dumps({"config": {}, "skips": [
        {"source": "nope", "target": "x", "kind": "identity"}]}).encode(),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_malformed_plans(mlp, tmp_path, name):
    model, before = mlp
    plan = tmp_path / "plan.json"
    plan.write_bytes(PLANS[name])
    line = refused(run("add-skips", model, "--plan", plan, "-o", tmp_path / "o.pt2"), model,
                   before, tmp_path / "o.pt2")
    assert "plan" in line
    assert plan.read_bytes() == PLANS[name]


def test_plans_that_are_not_regular_files(mlp, tmp_path):
    model, before = mlp
    for path in ("/dev/zero", tmp_path):
        line = refused(run("add-skips", model, "--plan", path, "-o", tmp_path / "o.pt2"), model,
                       before, tmp_path / "o.pt2")
        assert "not a regular file" in line
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(17 * 2 ** 20)
    assert "too large" in refused(run("add-skips", model, "--plan", big), model, before)


def test_a_plan_without_input_shapes_takes_them_from_the_flag(mlp, tmp_path):
    model, _ = mlp
    plan = tmp_path / "plan.json"
    assert run("add-skips", model, "--dry-run", "--plan-out", plan).exit_code == 0
    data = json.loads(plan.read_text())
    shapes = data.pop("input_shapes")
    plan.write_text(json.dumps(data))
    result = run("add-skips", model, "--plan", plan, "-i", ",".join(map(str, shapes[0])),
                 "-o", tmp_path / "o.pt2")
    assert result.exit_code == 0, result.output


# -- paths: nothing deleted, nothing overwritten, checked before any work -------------------------

def test_save_code_never_deletes_an_input_or_an_output(mlp, tmp_path):
    model, before = mlp
    code = tmp_path / "sc"
    assert run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", code).exit_code == 0
    plan = code / "plan.json"
    plan.write_text("{}")
    mine = code / "mine.txt"
    mine.write_text("mine")
    line = refused(run("add-skips", model, "--plan", plan, "--save-code", code), model, before)
    assert "holds the input" in line and plan.read_text() == "{}"
    line = refused(run("add-skips", model, "-o", code / "o.pt2", "--save-code", code), model,
                   before, code / "o.pt2")
    assert "holds -o" in line
    assert run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", code).exit_code == 0
    assert mine.read_text() == "mine" and plan.read_text() == "{}"


def test_save_code_refuses_the_current_folder_files_and_symlinks(mlp, tmp_path, monkeypatch):
    model, before = mlp
    afile = tmp_path / "afile"
    afile.write_text("mine")
    link = tmp_path / "link"
    (tmp_path / "empty").mkdir()
    link.symlink_to(tmp_path / "empty")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for folder, needle in ((".", "current folder"), (afile, "is a file"),
                           (link, "symbolic link")):
        line = refused(run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", folder),
                       model, before, tmp_path / "o.pt2")
        assert needle in line
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path / "in")) == ["mlp.pt2"]
    assert os.listdir(tmp_path / "empty") == []


def test_a_file_that_clashes_with_a_written_one_is_not_replaced(mlp, tmp_path):
    model, _ = mlp
    code = tmp_path / "sc"
    assert run("add-skips", model, "-o", tmp_path / "o.pt2", "--save-code", code).exit_code == 0
    marker = code / ".ressurgeon-code"
    marker.write_text(marker.read_text().replace("module.py\n", ""))  # module.py: not ours now
    (code / "module.py").write_text("# mine")
    line = one_line_error(run("add-skips", model, "-o", tmp_path / "o2.pt2", "--save-code", code))
    assert "holds module.py, which ressurgeon did not write" in line
    assert (code / "module.py").read_text() == "# mine" and not (tmp_path / "o2.pt2").exists()


@pytest.mark.parametrize("make,needle", [
    (lambda t: (t / "loop").symlink_to(t / "loop"), "loop"),
    (lambda t: None, "too long"),
])
def test_unusable_output_names(mlp, tmp_path, make, needle):
    model, before = mlp
    make(tmp_path)
    target = tmp_path / "loop" if needle == "loop" else tmp_path / ("x" * 300 + ".pt2")
    line = refused(run("add-skips", model, "-o", target), model, before)
    assert needle in line.lower() or "symbolic" in line.lower()


def test_an_unwritable_output_folder_is_refused_before_any_work(mlp, tmp_path, monkeypatch):
    import ressurgeon._io as io_module

    model, before = mlp

    def cannot(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io_module.tempfile, "NamedTemporaryFile", cannot)
    traced = []
    monkeypatch.setattr("ressurgeon.surgery.trace_model", lambda *a, **k: traced.append(1))
    line = refused(run("add-skips", model, "-o", tmp_path / "o.pt2"), model, before,
                   tmp_path / "o.pt2")
    assert "Permission denied" in line and not traced


def test_dry_run_writes_no_onnx_and_no_code(mlp, tmp_path):
    model, _ = mlp
    result = run("add-skips", model, "--dry-run", "--onnx", tmp_path / "m.onnx", "--save-code",
                 tmp_path / "sc", "--plan-out", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "p.json"]


def test_fake_no_verify_builds_no_example_tensors(mlp, tmp_path, monkeypatch):
    model, _ = mlp
    made = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(a) or real(*a, **k))
    result = run("add-skips", model, "--fake", "--no-verify", "-o", tmp_path / "o.pt")
    assert result.exit_code == 0, result.output
    assert made == [] and (tmp_path / "o.pt").exists()


# -- verification never passes on NaN ------------------------------------------------------------

def test_nan_in_a_rewritten_output_fails_verification():
    from ressurgeon.verify import compare_outputs

    want = [torch.ones(3)]
    report = compare_outputs(want, [torch.tensor([1.0, float("nan"), 1.0])], check="rewrite")
    assert not report.ok and report.nonfinite == 1 and report.max_abs_diff == 0
    same = compare_outputs([torch.tensor([float("inf")])], [torch.tensor([float("inf")])],
                           check="fold")
    assert same.ok and same.original_nonfinite == 1


def test_a_shortcut_path_that_overflows_is_rejected_with_a_reason():
    from ressurgeon import SkipConfig, add_skips

    class Big(torch.nn.Module):
        """float16 activations of 6e4: a 1x1 projection of them overflows to inf."""

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64)
            self.c, self.d = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128)
            self.head = torch.nn.Linear(128, 4)
            with torch.no_grad():
                self.a.weight.zero_()
                self.a.bias.fill_(6e4)
                self.b.weight.mul_(1e-4)
                self.c.weight.mul_(1e-3)

        def forward(self, x):
            for layer in (self.a, self.b, self.c, self.d):
                x = torch.relu(layer(x))
            return self.head(x)

    model, x = Big().half().eval(), torch.randn(2, 16).half()
    result = add_skips(model, (x,), SkipConfig(span=2))
    verdicts = {(s.source_layer, s.target_layer): s.reason for s in result.spans}
    assert verdicts[("a", "c")] == "non-finite"
    assert [(s.source_layer, s.target_layer) for s in result.skips] == [("b", "d")]
    assert result.parity.ok and result.parity.nonfinite == 0


# -- real processes -------------------------------------------------------------------------------

def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ressurgeon", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_a_file_size_limit_is_a_one_line_error_and_leaves_no_file(mlp, tmp_path):
    model, before = mlp

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = _cli("add-skips", model, "-o", tmp_path / "o.pt2", preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), done.stderr
    assert digest(model) == before and not (tmp_path / "o.pt2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(mlp, tmp_path):
    model, _ = mlp
    stale = tmp_path / ".o.pt2.999999.ressurgeon-tmp.pt2"  # no process 999999 is alive
    stale.write_bytes(b"half")
    other = tmp_path / ".notes.txt.999999.ressurgeon-tmp"  # another destination: left alone
    other.write_bytes(b"x")
    result = run("add-skips", model, "-o", tmp_path / "o.pt2")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and other.exists() and (tmp_path / "o.pt2").exists()


# The run under test pauses at the last moment a kill can hit: its output is whole in the
# temporary file and about to be renamed. It is killed there, every time (no race with a timer).
PAUSE_BEFORE_RENAME = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    real_replace, marker = os.replace, Path(sys.argv[1])

    def paused(src, dst, *args, **kwargs):
        if "ressurgeon-tmp" in os.fspath(src) and Path(dst).name == "o.pt2":
            marker.write_text(str(os.getpid()))
            time.sleep(600)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = paused
    from ressurgeon.cli import main
    sys.argv = ["ressurgeon", *sys.argv[2:]]
    main()
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_run_never_leaves_a_half_file_under_the_final_name(mlp, tmp_path):
    model, _ = mlp
    final, marker = tmp_path / "o.pt2", tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_BEFORE_RENAME, str(marker), "add-skips",
                             str(model), "-o", str(final), "-q"], env=env)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run ended ({proc.poll()}) without renaming a temporary file"
        temps = [p for p in tmp_path.iterdir() if "ressurgeon-tmp" in p.name]
        assert [p.name for p in temps] == [f".o.pt2.{proc.pid}.ressurgeon-tmp.pt2"]
        assert torch.export.load(temps[0]) is not None    # written whole, not yet renamed
        assert not final.exists()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists()
    # the next run removes the dead run's temporary file and writes the output
    assert run("add-skips", model, "-o", final).exit_code == 0
    assert torch.export.load(final) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.pt2", "paused"]


# -- --arch: the user's own code failing is their input, not our bug -----------------------------

ARCH_MODULES = {
    "syntax_err": "def build(:\n",
    "raises_at_import": "raise RuntimeError('boom at import')\n",
    "exits": "import sys\ndef build():\n    sys.exit(0)\n",
    "not_a_module": "def build():\n    return 42\n",
}


@pytest.mark.parametrize("arch,needle", [
    ("..mod:f", "must look like module:callable"),
    ("syntax_err:build", "SyntaxError"),
    ("raises_at_import:build", "boom at import"),
    ("exits:build", "SystemExit"),
    ("sys:exit", "SystemExit"),
    ("not_a_module:build", "not an nn.Module"),
    ("no_such_module:build", "cannot import"),
])
def test_bad_arch(tmp_path, monkeypatch, arch, needle):
    for name, code in ARCH_MODULES.items():
        (tmp_path / f"{name}.py").write_text(code)
    weights = tmp_path / "w.pt"
    torch.save(mlp_changing_widths().state_dict(), weights)
    before = digest(weights)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    line = refused(run("add-skips", weights, "--arch", arch, "-i", "2,12", "-o", tmp_path / "o.pt2"),
                   weights, before, tmp_path / "o.pt2")
    assert needle in line
