"""Trust by construction: a file's strings are checked against an allowlist before torch reads
them (ressurgeon.load.validate), so no crafted name, guard or shape expression runs.

Each route of issue 22 is a crafted file from ``crafted.py``. Where torch alone runs the
payload, a negative control shows it (the attack is real); routes 4 and 6 ran through
ressurgeon's own tracing and module swapping before this check (they reach Python source
that fx generates from a submodule name). Every command that reads the file, and the
Python API, must refuse it: exit 2, one line, and the payload's marker never written.
"""

import importlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crafted
from ressurgeon import UnsafeFileError, load_model
from ressurgeon.load.validate import (capture_ranges, check_archive, drop_guards_code,
                                      expression_problem, guard_problem)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "mlp.pt2"
    model, x = crafted.export_clean(path)
    return path, model, x


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a payload ran"


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ressurgeon", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def refused_by_every_reader(path, tmp_path, marker) -> list[str]:
    """inspect and add-skips exit 2 with one line; load_model raises UnsafeFileError."""
    lines = []
    for command in (["inspect", path, "-i", "3,4"],
                    ["add-skips", path, "-i", "3,4", "-o", tmp_path / "out.pt2"]):
        done = cli(*command)
        shown = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert done.returncode == 2, done.stderr
        assert len(shown) == 1 and shown[0].startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        lines.append(shown[0])
    with pytest.raises(UnsafeFileError) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.pt2").exists()
    return lines


def torch_runs(path, x, marker) -> bool:
    """Negative control: torch alone (load, unlift, run) runs the payload."""
    try:
        torch.export.load(path).module()(x)
    except Exception:
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


# (route, torch alone runs it, a word the refusal names)
ROUTES = [("1 placeholder target", True, "graph.inputs"),
          ("2 parameter path", True, "parameter_name"),
          ("3 guards code", True, "guards_code"),
          ("6 nn_module_stack path", False, "nn_module_stack path")]


@pytest.mark.parametrize("route,live,field", ROUTES, ids=[r[0] for r in ROUTES])
def test_crafted_archive_runs_nothing(route, live, field, clean, tmp_path, marker):
    path, _, x = clean
    evil = tmp_path / "evil.pt2"
    crafted.write_zip(evil, crafted.PT2_ROUTES[route](crafted.read_zip(path), marker))
    if live:
        assert torch_runs(evil, x, marker), "negative control: torch alone should run it"
    for line in refused_by_every_reader(evil, tmp_path, marker):
        assert "refused: " in line and field in line and "--trust-pickle" in line
        assert len(line) < 600


def test_nn_pickle_with_a_named_child_runs_nothing(tmp_path, marker):
    """Route 4: the safe unpickler rebuilds it (torch.nn classes only); tracing it would
    write the child's name into generated source."""
    from ressurgeon._nn_pickle import nn_safe_globals

    evil = tmp_path / "evil.pt"
    crafted.nn_pickle_with_named_child(evil, marker)
    with nn_safe_globals():
        module = torch.load(evil, weights_only=True)
    try:  # negative control: fx alone runs it
        torch.fx.symbolic_trace(module)(torch.randn(3, 4))
    except Exception:
        pass
    assert marker.exists(), "negative control: tracing should run it"
    marker.unlink()
    for line in refused_by_every_reader(evil, tmp_path, marker):
        assert "module name in the root module" in line


def test_guards_code_is_never_compiled_for_an_untrusted_file(tmp_path, monkeypatch, caplog):
    """A legitimate guard still is not run: torch derives its input checks from the
    range constraints (data) instead."""
    import torch.export._unlift as unlift

    class Halves(torch.nn.Module):
        def forward(self, x):
            return x[: x.shape[0] // 2] * 2

    ep = torch.export.export(Halves(), (torch.randn(6, 3),),
                             dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    assert ep._guards_code, "the model should carry guards"
    path = tmp_path / "halves.pt2"
    torch.export.save(ep, path)
    assert check_archive(path).guards_code == len(ep._guards_code)
    compiled = []
    real = unlift._convert_guards_code_to_fn
    monkeypatch.setattr(unlift, "_convert_guards_code_to_fn",
                        lambda code, paths: compiled.append(list(code)) or real(code, paths))
    with caplog.at_level("DEBUG", logger="ressurgeon.load.validate"):
        model = load_model(path)
    assert compiled and not set(ep._guards_code) & set(compiled[0])
    assert "not running the" in caplog.text
    x = torch.randn(8, 3)
    torch.testing.assert_close(model(x), Halves()(x), rtol=0, atol=0)
    loaded = torch.export.load(path)
    drop_guards_code(loaded, path)
    assert loaded._guards_code == []
    done = cli("inspect", path, "--debug")
    assert done.returncode == 0 and "debug: " in done.stderr and "guards code" in done.stderr


# -- resources --------------------------------------------------------------------------------

def test_stride_zero_archive_is_refused_before_torch_reads_it(clean, tmp_path, monkeypatch):
    """A 4-byte weight claimed as 20000x20000 (1.6 GB once copied)."""
    path, _, _ = clean
    evil = tmp_path / "bomb.pt2"
    crafted.write_zip(evil, crafted.stride_zero_weight(crafted.read_zip(path), None))
    assert evil.stat().st_size < 100_000

    def reached(*args, **kwargs):
        raise AssertionError("torch.export.load was reached")

    monkeypatch.setattr(torch.export, "load", reached)
    with pytest.raises(UnsafeFileError, match=r"400000000 elements from 4 bytes.*stride 0"):
        load_model(evil)


def test_stride_zero_nn_pickle_is_refused_before_anything_copies_it(tmp_path):
    evil = tmp_path / "bomb.pt"
    crafted.nn_pickle_with_stride_zero_weight(evil)
    assert evil.stat().st_size < 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnsafeFileError, match="400000000 elements from 4 stored bytes"):
        load_model(evil)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, "the weight was materialised"


def test_power_tower_is_refused_without_evaluating_it(clean, tmp_path):
    path, _, _ = clean
    evil = tmp_path / "tower.pt2"
    crafted.write_zip(evil, crafted.power_tower(crafted.read_zip(path), None))
    with pytest.raises(UnsafeFileError, match="shape expression.*exponent"):
        load_model(evil)


def test_deeply_nested_program_json_is_an_unsafe_file(clean, tmp_path):
    path, _, _ = clean
    members = [(n, b"[" * 100_000 + b"]" * 100_000 if n.endswith("models/model.json") else d)
               for n, d in crafted.read_zip(path)]
    evil = tmp_path / "deep.pt2"
    crafted.write_zip(evil, members)
    with pytest.raises(UnsafeFileError, match="not JSON this version reads"):
        load_model(evil)


@pytest.mark.parametrize("text,ok", [
    ("Symbol('s77', positive=True, integer=True)", True),
    ("Add(Mul(Symbol('s0', integer=True), FloorDiv(Symbol('s0'), Integer(2))), Integer(1))",
     True),
    ("Pow(Symbol('s0'), Integer(-1))", True),
    ("s77*2 + Max(s1, 4) // 3", True),
    ("Pow(10, 9e18)", False),
    ("Pow(10, Pow(10, Pow(10, 9)))", False),
    ("((s0**64)**64)**64", False),
    ("__import__('os').system('x')", False),
    ("Symbol('s0').__class__", False),
    ("open", False),
    ("x" * 20_000, False),
])
def test_shape_expressions_are_bounded_arithmetic(text, ok):
    assert (expression_problem(text) is None) is ok, expression_problem(text)


@pytest.mark.parametrize("text,ok", [
    ("L['x'].size()[0] > 4", True),
    ("(L['x'].size()[0] // 2) <= L['x'].size()[0]", True),
    ("L['x'].size()[0] == L['y'].stride()[1]", True),
    ("L['x'].__class__ == 1", False),
    ("L['x'].size()[0] == __import__('os').getpid()", False),
    ("L['x'].size()[0] ** 100 > 1", False),
])
def test_guards_are_checked_as_data(text, ok):
    assert (guard_problem(text) is None) is ok, guard_problem(text)


@pytest.mark.parametrize("target,ok", [
    ("torch.ops.aten.linear.default", True), ("torch.ops.aten.sym_size.int", True),
    ("torch.ops.higher_order.cond", True), ("_operator.mul", True), ("torch.sym_max", True),
    ("math.trunc", True), ("torch.ops.import_module.x.y", False), ("builtins.eval", False),
    ("torch.os.system", False), ("torch.ops.aten.linear.default(", False),
    ("#extension", False),
])
def test_call_targets_are_an_allowlist(clean, tmp_path, target, ok):
    path, _, _ = clean

    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    evil = tmp_path / "target.pt2"
    crafted.write_zip(evil, crafted.edit_json(crafted.read_zip(path), "models/model.json", edit))
    if ok:
        check_archive(evil)
    else:
        with pytest.raises(UnsafeFileError, match="an operator torch.export writes"):
            check_archive(evil)


# -- what still loads -------------------------------------------------------------------------

def test_capture_ranges_are_the_archives_range_constraints_as_data(clean):
    path, _, _ = clean
    loaded = torch.export.load(path)
    want = {str(k): (int(v.lower), None if str(v.upper) in ("int_oo", "oo") else int(v.upper))
            for k, v in loaded.range_constraints.items()}
    assert capture_ranges(path) == want and len(want) == 1


def test_readme_examples_and_a_written_archive_still_load(example_models, clean, tmp_path):
    path, model, x = clean
    for example in example_models.values():
        assert isinstance(load_model(example), torch.nn.Module)
    loaded = load_model(path).eval()
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    out = tmp_path / "rewritten.pt2"
    done = cli("add-skips", example_models["vgg"], "-o", out)
    assert done.returncode == 0, done.stderr
    check_archive(out)
    assert isinstance(load_model(out), torch.nn.Module)


def test_import_guard_refuses_only_what_the_file_names(tmp_path, monkeypatch):
    """Torch's own import of an installed package goes ahead; a module the file names
    does not."""
    from ressurgeon._refuse_code import refuse_code_execution

    (tmp_path / "named_by_file.py").write_text("VALUE = 1\n")
    (tmp_path / "imported_by_torch.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError), refuse_code_execution(
            file_names=frozenset({"named_by_file"})) as refused:
        importlib.import_module("named_by_file")
    assert refused == ["an import of named_by_file"]
    with refuse_code_execution(file_names=frozenset({"named_by_file"})) as refused:
        assert importlib.import_module("imported_by_torch").VALUE == 2
    assert refused == []
    monkeypatch.delitem(sys.modules, "imported_by_torch")
    with pytest.raises(RuntimeError), refuse_code_execution():  # no names given: closed
        importlib.import_module("imported_by_torch")


def test_the_names_a_file_mentions_are_collected(clean):
    """What the import guard treats as chosen by the file: every dotted name and prefix."""
    path, _, _ = clean
    names = check_archive(path).names
    assert {"torch.ops.aten.linear.default", "torch.ops.aten", "0.weight", "0"} <= names
