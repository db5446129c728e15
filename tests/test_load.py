"""Stage 1 and 6, load and save: every format, and every kind of bad file the CLI may meet."""

import copy
import json
import os
import pickle
import random
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from models import DataBranchNet, plain_cnn
from ressurgeon import LoadError, UnsafeFileError, add_skips
from ressurgeon.cli import app
from ressurgeon.save import save_code, save_model
from ressurgeon.load import from_torchscript, load_model

runner = CliRunner()
MARK = "/tmp/ressurgeon-pickle-ran"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_exit_2(result):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


class RunsACommand:
    """Unpickling this object runs a shell command: the attack a pickle allows."""

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


@pytest.fixture
def arch_module(tmp_path, monkeypatch):
    """A module 'mynets' importable from the current folder, as a user would have it."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                 nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                 nn.Linear(8, 2))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynets", None)
    import mynets
    torch.manual_seed(0)
    return mynets.build()


def test_state_dict_with_arch(arch_module, tmp_path):
    for name in ("w.pt", "w.pth"):
        torch.save(arch_module.state_dict(), tmp_path / name)
        model = load_model(tmp_path / name, arch="mynets:build")
        x = torch.randn(3, 6)
        torch.testing.assert_close(model(x), arch_module(x), rtol=0, atol=0)
    result = cli("add-skips", tmp_path / "w.pt", "--arch", "mynets:build", "-i", "3,6",
                 "-o", tmp_path / "out.pt2", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.pt2").exists()


def test_safetensors_with_arch(arch_module, tmp_path):
    from safetensors.torch import save_file

    save_file(arch_module.state_dict(), str(tmp_path / "w.safetensors"))
    model = load_model(tmp_path / "w.safetensors", arch="mynets:build")
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), arch_module(x), rtol=0, atol=0)


def test_weights_without_arch_say_what_to_pass(arch_module, tmp_path):
    torch.save(arch_module.state_dict(), tmp_path / "w.pt")
    with pytest.raises(LoadError, match="pass --arch module:callable"):
        load_model(tmp_path / "w.pt")
    with pytest.raises(LoadError, match="cannot import 'nosuch'"):
        load_model(tmp_path / "w.pt", arch="nosuch:build")
    with pytest.raises(LoadError, match="do not fit"):
        torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
        load_model(tmp_path / "other.pt", arch="mynets:build")


class WrappedCNN(nn.Module):
    """A module class of the user's own: unpickling it imports and runs this file's code."""

    def __init__(self):
        super().__init__()
        self.body = plain_cnn()

    def forward(self, x):
        return self.body(x)


def test_pickled_torch_nn_module_loads_without_trust(tmp_path):
    model = plain_cnn().eval()
    torch.save(model, tmp_path / "full.pt")
    loaded = load_model(tmp_path / "full.pt")
    assert type(loaded) is nn.Sequential and not loaded.training
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_pickled_module_of_own_class_needs_trust(tmp_path):
    model = WrappedCNN().eval()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(UnsafeFileError, match="state_dict.*--arch.*\\.pt2.*--trust-pickle"):
        load_model(tmp_path / "full.pt")
    loaded = load_model(tmp_path / "full.pt", trust_pickle=True)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    msg = assert_one_line_exit_2(cli("add-skips", tmp_path / "full.pt", "-i", "1,3,16,16"))
    assert "needs full unpickling" in msg and "test_load.WrappedCNN, not torch.nn classes" in msg
    ok = cli("add-skips", tmp_path / "full.pt", "-i", "1,3,16,16", "--trust-pickle",
             "-o", tmp_path / "o.pt2")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("layout", ["raw pickle", "torch.save zip"])
def test_malicious_pickle_never_runs(tmp_path, layout):
    if os.path.exists(MARK):
        os.remove(MARK)
    path = tmp_path / "evil.pt"
    if layout == "raw pickle":
        path.write_bytes(pickle.dumps(RunsACommand()))
    else:
        torch.save(RunsACommand(), path)
    msg = assert_one_line_exit_2(cli("add-skips", path, "-i", "1,3", "-o", tmp_path / "o.pt2"))
    assert "needs full unpickling" in msg and "system" in msg
    assert not os.path.exists(MARK)
    assert not (tmp_path / "o.pt2").exists()


def test_torchscript_is_refused_with_what_to_save(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ts.pt")
    msg = assert_one_line_exit_2(cli("add-skips", tmp_path / "ts.pt", "-i", "1,2"))
    assert "TorchScript" in msg and "state_dict" in msg


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (bytes(range(256)) * 8, "not a readable PyTorch file"),
    (b"PK\x03\x04garbage", "not a readable PyTorch file"),
])
def test_unreadable_files(tmp_path, content, needle):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    assert needle in assert_one_line_exit_2(cli("add-skips", path, "-i", "1,3"))


def test_directory_is_not_a_model(tmp_path):
    assert "not a file" in assert_one_line_exit_2(cli("inspect", tmp_path))


def test_fuzzed_archives_all_exit_2_and_write_nothing(example_models, tmp_path):
    source = example_models["mlp"].read_bytes()
    rng = random.Random(1234)
    out = tmp_path / "o.pt2"
    for i in range(60):
        data = bytearray(source)
        if i % 2 == 0:
            data = data[:rng.randrange(1, len(data))]   # truncated at a random point
        else:
            for _ in range(rng.randint(1, 4)):          # a few flipped bits
                j = rng.randrange(len(data))
                data[j] ^= 1 << rng.randrange(8)
        bad = tmp_path / f"bad{i}.pt2"
        bad.write_bytes(bytes(data))
        result = cli("add-skips", bad, "-o", out)
        assert_one_line_exit_2(result)
        assert not out.exists(), f"case {i} wrote an output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_formats_round_trip(tmp_path):
    torch.manual_seed(0)
    model = plain_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    result = add_skips(model, (x,), )
    with torch.no_grad():
        expected = result.module(x)
    # .pt: a pickled GraphModule, loadable only with trust
    save_model(result.module, tmp_path / "m.pt", (x,))
    with pytest.raises(UnsafeFileError):
        load_model(tmp_path / "m.pt")
    torch.testing.assert_close(load_model(tmp_path / "m.pt", trust_pickle=True)(x), expected,
                               rtol=0, atol=0)
    # .safetensors: the weights alone, loadable into the same architecture
    from safetensors.torch import load_file

    save_model(result.module, tmp_path / "m.safetensors", (x,))
    state = load_file(str(tmp_path / "m.safetensors"))
    assert set(state) == set(result.module.state_dict())
    # readable source plus weights
    folder = save_code(result.module, tmp_path / "rewritten_code")
    source = (folder / "module.py").read_text()
    assert "skip_0_0__0_7" in source
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        rebuilt = importlib.import_module("rewritten_code").RewrittenModel().eval()
    finally:
        sys.path.remove(str(tmp_path))
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)


def test_unknown_output_suffix_is_refused(example_models, tmp_path):
    msg = assert_one_line_exit_2(cli("add-skips", example_models["mlp"], "-o", tmp_path / "m.h5"))
    assert ".pt2, .pt, .pth or .safetensors" in msg


def test_outputs_get_ordinary_file_modes(tmp_path):
    from ressurgeon._io import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("attack", ["pickled weight", "pickled sample inputs"])
def test_pt2_archive_cannot_smuggle_a_pickle(example_models, tmp_path, attack):
    """torch.export.load unpickles payloads marked use_pickle and retries sample inputs
    with weights_only=False: an archive must not run code without --trust-pickle."""
    import io
    import json
    import zipfile

    if os.path.exists(MARK):
        os.remove(MARK)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(example_models["mlp"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if attack == "pickled weight":
                if info.filename.endswith("model_weights_config.json"):
                    config = json.loads(data)
                    config["config"]["0.weight"]["use_pickle"] = True
                    data = json.dumps(config).encode()
                elif info.filename.endswith("weights/weight_0"):
                    data = pickle.dumps(RunsACommand())
            elif info.filename.endswith("sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save(RunsACommand(), buffer)
                data = buffer.getvalue()
            dst.writestr(info.filename, data)
    for command in ("inspect", "add-skips", "fold", "export", "gates"):
        args = [command, evil] + (["--onnx", tmp_path / "o.onnx"] if command == "export" else [])
        msg = assert_one_line_exit_2(cli(*args, "-i", "4,64") if command != "gates" else cli(*args))
        assert "would run code from the file" in msg
    assert not os.path.exists(MARK)


@pytest.fixture(scope="module")
def pt_files(tmp_path_factory):
    """Each kind of .pt file people have, written from one small CNN in eval mode."""
    folder = tmp_path_factory.mktemp("pt")
    torch.manual_seed(0)
    model, x = plain_cnn().eval(), torch.randn(2, 3, 16, 16)
    files = {kind: folder / f"{kind.replace(' ', '_')}.pt" for kind in (
        "state_dict", "torch.nn pickle", "own class pickle", "traced TorchScript",
        "scripted TorchScript")}
    torch.save(model.state_dict(), files["state_dict"])
    torch.save(model, files["torch.nn pickle"])
    wrapped = WrappedCNN().eval()
    wrapped.body.load_state_dict(model.state_dict())
    torch.save(wrapped, files["own class pickle"])
    torch.jit.save(torch.jit.trace(model, (x,)), files["traced TorchScript"])
    torch.jit.save(torch.jit.script(model), files["scripted TorchScript"])
    return model, x, files


REFUSED_WITHOUT_TRUST = {
    "state_dict": ("holds weights only", "--arch"),
    "own class pickle": ("needs full unpickling", "WrappedCNN", "--arch", ".pt2",
                         "--trust-pickle"),
    "traced TorchScript": ("TorchScript", "state_dict", "--arch", "--trust-pickle"),
    "scripted TorchScript": ("TorchScript", "state_dict", "--arch", "--trust-pickle"),
}


def add_skips_json(path, tmp_path, *flags):
    out = tmp_path / "out.pt2"
    result = cli("add-skips", path, "-i", "2,3,16,16", "-o", out, "--json", *flags)
    return result, out


@pytest.mark.parametrize("kind", ["torch.nn pickle", *REFUSED_WITHOUT_TRUST])
def test_each_kind_of_pt_without_trust(kind, pt_files, tmp_path):
    result, out = add_skips_json(pt_files[2][kind], tmp_path)
    if kind == "torch.nn pickle":
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["skips"] and report["parity"]["max_abs_diff"] == 0
        assert out.exists()
        return
    msg = assert_one_line_exit_2(result)
    for needle in REFUSED_WITHOUT_TRUST[kind]:
        assert needle in msg, (needle, msg)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["traced TorchScript", "scripted TorchScript"])
def test_torchscript_with_trust_becomes_a_trainable_graph(kind, pt_files, tmp_path):
    model, x, files = pt_files
    result, out = add_skips_json(files[kind], tmp_path, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"]["max_abs_diff"] == 0 and out.exists()

    script = load_model(files[kind], trust_pickle=True)
    assert isinstance(script, torch.jit.ScriptModule)
    converted = from_torchscript(script, (x,))
    assert not converted.training
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    names = dict(converted.named_parameters())
    assert sorted(p.shape for p in names.values()) == sorted(p.shape for p in model.parameters())
    # BatchNorm follows .train() again: batch statistics, like the original in train mode
    original = copy.deepcopy(model).train()
    converted.train()
    torch.testing.assert_close(converted(x), original(x))
    converted(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in names.values())


def test_torchscript_that_branches_on_inputs_is_refused_clearly(tmp_path):
    torch.jit.save(torch.jit.script(DataBranchNet()), tmp_path / "branchy.pt")
    script = load_model(tmp_path / "branchy.pt", trust_pickle=True)
    with pytest.raises(LoadError, match="branches or loops on input values.*state_dict"):
        from_torchscript(script, (torch.randn(2, 4),))
    msg = assert_one_line_exit_2(cli("add-skips", tmp_path / "branchy.pt", "-i", "2,4",
                                     "--trust-pickle", "-o", tmp_path / "o.pt2"))
    assert "branches or loops" in msg


def test_missing_torchscript_converter_is_a_load_error(monkeypatch):
    import torch._export.converter as converter

    monkeypatch.delattr(converter, "TS2EPConverter")
    script = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(LoadError, match="no TorchScript converter"):
        from_torchscript(script, (torch.randn(1, 2),))
