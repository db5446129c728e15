"""One output-path rule for every command: never inside an input, only regular files replaced,
never through a link; --save-code replaces only files whose hash proves ressurgeon wrote them."""

import hashlib
import os
import socket

import pytest
import torch
import torch.fx as fx
from helpers import one_line_error, run_cli as run

from ressurgeon._io import CODE_MARKER, check_output
from ressurgeon.errors import ExportError, UnsafeFileError
from ressurgeon.save import save_code


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hf_folder(tmp_path):
    """A folder shaped like a save_pretrained checkpoint: the refusal comes before any load."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights the user keeps")
    return folder


@pytest.mark.parametrize("args", [
    ["fold", "{hf}", "-o", "{hf}/model.safetensors"],
    ["fold", "{hf}", "-o", "{hf}/folded.pt2"],
    ["export", "{hf}", "--onnx", "{hf}/model.onnx"],
    ["add-skips", "{hf}", "-o", "{hf}/model.safetensors"],
    ["add-skips", "{hf}", "-o", "{hf}/../o.pt2", "--plan-out", "{hf}/config.json"],
])
def test_no_command_writes_inside_an_input_folder(hf_folder, args):
    before = {p.name: _digest(p) for p in hf_folder.iterdir()}
    line = one_line_error(run(*[a.format(hf=hf_folder) for a in args]))
    assert "inside the input" in line
    assert {p.name: _digest(p) for p in hf_folder.iterdir()} == before


def test_save_code_inside_an_input_folder_is_refused(example_models, hf_folder):
    line = one_line_error(run("add-skips", hf_folder, "-o", hf_folder.parent / "o.pt2",
                              "--save-code", hf_folder / "code"))
    assert "inside the input" in line
    assert not (hf_folder / "code").exists()


def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (tmp_path / "link_to_null").symlink_to("/dev/null")
    target = tmp_path / "someone_elses.txt"
    target.write_text("keep me")
    (tmp_path / "link_to_file").symlink_to(target)
    return sock, {"fifo": "FIFO", "sock": "socket", "link_to_null": "symbolic link",
                  "link_to_file": "symbolic link"}


@pytest.mark.parametrize("flag", ["-o", "--plan-out"])
def test_outputs_replace_only_regular_files(example_models, tmp_path, flag):
    sock, cases = _special_files(tmp_path)
    try:
        for name, kind in cases.items():
            other = {"-o": tmp_path / "o.pt2"} if flag == "--plan-out" else {}
            args = [a for k, v in other.items() for a in (k, v)]
            line = one_line_error(run("add-skips", example_models["mlp"], *args,
                                      flag, tmp_path / name))
            assert kind in line, line
        for path in ("/proc/self/fd/1", "/dev/null"):
            line = one_line_error(run("add-skips", example_models["mlp"], "-o",
                                      tmp_path / "o.pt2", "--plan-out", path))
            assert "symbolic link" in line or "character device" in line, line
    finally:
        sock.close()
    assert (tmp_path / "someone_elses.txt").read_text() == "keep me"
    assert not (tmp_path / "o.pt2").exists()


def test_check_output_is_the_library_rule(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(ExportError, match="inside the input"):
        check_output(src / "sub.pt2", [src], "-o")
    (src / "w.pt").write_bytes(b"input")
    with pytest.raises(ExportError, match="one of the inputs"):
        check_output(src / "w.pt", [src / "w.pt"], "-o")
    with pytest.raises(ExportError, match="under /proc"):
        check_output("/proc/version", [], "-o")
    assert check_output(tmp_path / "new.pt2", [src], "-o") == (tmp_path / "new.pt2").resolve()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):  # a tmpfs of plain files
        assert check_output("/dev/shm/ressurgeon-test-new.pt2", [], "-o")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x)


def _graph_module():
    torch.manual_seed(0)
    return fx.symbolic_trace(_Net())


def test_save_code_marker_records_hashes_and_rewrites_its_own_folder(tmp_path):
    folder = save_code(_graph_module(), tmp_path / "code")
    lines = (folder / CODE_MARKER).read_text().splitlines()[1:]
    listed = dict(reversed(line.split("  ")) for line in lines)
    assert set(listed) == {"module.py", "__init__.py", "model.safetensors"}
    assert all(_digest(folder / n) == h for n, h in listed.items())
    save_code(_graph_module(), folder)  # its own unchanged files: replaced
    (folder / "module.py").write_text("# the user's edit\n")
    with pytest.raises(ExportError, match="module.py, which ressurgeon did not write"):
        save_code(_graph_module(), folder)
    assert (folder / "module.py").read_text() == "# the user's edit\n"


def test_crafted_marker_never_deletes_or_replaces_a_users_file(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    mine = {"notes.txt": b"my notes", "module.py": b"# mine\n"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    fake = "0" * 64
    (folder / CODE_MARKER).write_text("written by ressurgeon\n" +
                                      "".join(f"{fake}  {n}\n" for n in mine) +
                                      "notes.txt\n")  # the old format: no hash
    with pytest.raises(ExportError, match="did not write"):
        save_code(_graph_module(), folder)
    assert {n: (folder / n).read_bytes() for n in mine} == mine
    (folder / "module.py").unlink()
    save_code(_graph_module(), folder)  # now no clash: writes its files, deletes nothing
    assert (folder / "notes.txt").read_bytes() == b"my notes"
    assert (folder / "module.py").exists()


def test_marker_listing_a_directory_is_exit_2(example_models, tmp_path):
    folder = tmp_path / "code"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.txt").write_text("keep")
    (folder / CODE_MARKER).write_text(f"written by ressurgeon\n{'0' * 64}  sub\n")
    line = one_line_error(run("add-skips", example_models["mlp"], "-o", tmp_path / "o.pt2",
                              "--save-code", folder))
    assert "lists 'sub', which is a folder" in line
    assert (folder / "sub" / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("child", ["/tmp/abs/path/file", "a b", "x\"); import os #", "..", ""])
def test_save_code_refuses_child_names_that_are_not_identifiers(tmp_path, child):
    gm = _graph_module()
    gm._modules[child] = torch.nn.ReLU()  # a name only a crafted file could give
    with pytest.raises(UnsafeFileError, match="refused: a module name written by --save-code"):
        save_code(gm, tmp_path / "code")
    assert not (tmp_path / "code").exists()
    assert not os.path.exists("/tmp/abs/path/file")


class _Custom(torch.nn.Module):  # not torch.nn's, not ressurgeon's: needs full unpickling
    def forward(self, x):
        return x * 2


def test_save_code_package_loads_its_weights_safely(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.a = torch.nn.Linear(3, 3)
    net.b = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2))
    graph = fx.symbolic_trace(torch.nn.Sequential(net.a, net.b)).graph
    gm = fx.GraphModule(torch.nn.Sequential(net.a, net.b), graph)
    folder = save_code(gm, tmp_path / "safe_code")
    source = (folder / "module.py").read_text()
    assert "torch.load" not in source and "pickle" not in source
    assert str(tmp_path) not in source  # weights come from the folder, wherever it moves
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (folder).rename(moved / "safe_code")
    monkeypatch.syspath_prepend(str(moved))
    import importlib

    rebuilt = importlib.import_module("safe_code").RewrittenModel()
    x = torch.randn(4, 3)
    torch.testing.assert_close(rebuilt(x), gm(x), rtol=0, atol=0)


def test_save_code_refuses_a_child_no_constructor_call_rebuilds(tmp_path):
    root = torch.nn.Module()
    root.c = torch.nn.Sequential(_Custom())
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("c", (x,)))
    gm = fx.GraphModule(root, graph)
    with pytest.raises(ExportError, match=r"cannot rebuild submodule 'c.0' \(.*_Custom\).*"
                                          "--trust-pickle"):
        save_code(gm, tmp_path / "code")
    assert not (tmp_path / "code").exists()
