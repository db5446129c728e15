"""--save-code writes a package that rebuilds the model by constructor calls: it imports in a
fresh process, computes what the rewritten model computes, and holds no pickle.

Tolerance: atol 1e-6, rtol 0 between the package and the rewritten model (the same ops on
the same weights; another process may use another thread count, so bitwise equality is not
promised). Every case below measured a difference of exactly 0 on the machine it was written on.
"""

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from helpers import one_line_error, run_cli as run
from models import PackedLSTM, mlp_changing_widths, plain_cnn, randomize_bn

from ressurgeon import SkipConfig, add_skips, load_model, save_code
from ressurgeon.errors import ExportError, UnsafeFileError

ATOL = 1e-6

# run in a fresh interpreter: import the package from its parent folder, run it on saved inputs
_RUN = """
import json, sys, torch
torch.set_num_threads(1)
folder, name, inputs, expected = sys.argv[1:5]
sys.path[:0] = [folder] + sys.argv[5:]
model = __import__(name).RewrittenModel().eval()
x = torch.load(inputs, weights_only=True)
y = torch.load(expected, weights_only=True)
with torch.no_grad():
    out = model(*x)
out = out[0] if isinstance(out, tuple) else out
print(json.dumps({"diff": float((out - y).abs().max()), "shape": list(out.shape)}))
"""


def run_package(folder, inputs, expected, *extra_paths) -> dict:
    """The package's output on ``inputs`` compared with ``expected``, in a fresh process."""
    scratch = folder.parent
    torch.save(tuple(inputs), scratch / "inputs.pt")
    torch.save(expected, scratch / "expected.pt")
    proc = subprocess.run([sys.executable, "-c", _RUN, str(folder.parent), folder.name,
                           str(scratch / "inputs.pt"), str(scratch / "expected.pt"),
                           *map(str, extra_paths)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def trained_like(module: nn.Module) -> nn.Module:
    """Gates open and every weight moved, so each shortcut changes the output."""
    randomize_bn(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
            else:
                p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _lstm():
    return PackedLSTM(layers=4)


CASES = {  # name: (model, input shape, config, a constructor call module.py must hold)
    "cnn_add": (plain_cnn, (2, 3, 16, 16), SkipConfig(join="add"), "Shortcut('preserve'"),
    "cnn_highway": (plain_cnn, (2, 3, 16, 16), SkipConfig(join="highway"), "HighwayShortcut("),
    "cnn_concat": (plain_cnn, (2, 3, 16, 16), SkipConfig(join="concat"), "ConcatJoin("),
    "mlp": (mlp_changing_widths, (4, 12), SkipConfig(init="standard"), "nn.Linear(12, 16)"),
    "lstm": (_lstm, (5, 2, 4), SkipConfig(), "nn.LSTM(16, 16)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_package_rebuilds_the_rewritten_model_in_a_fresh_process(case, tmp_path):
    build, shape, config, call = CASES[case]
    x = torch.randn(shape)
    result = add_skips(build().eval(), (x,), config)
    assert result.skips
    model = trained_like(result.module)
    with torch.no_grad():
        expected = model(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    folder = save_code(model, tmp_path / f"pkg_{case}")
    source = (folder / "module.py").read_text()
    assert "torch.load" not in source and "pickle" not in source
    assert call in source
    assert sorted(p.name for p in folder.iterdir()) == [
        ".ressurgeon-code", "__init__.py", "model.safetensors", "module.py"]
    report = run_package(folder, (x,), expected)
    assert report["shape"] == list(expected.shape)
    assert report["diff"] <= ATOL


def test_pt2_input_package_imports_and_runs(example_models, tmp_path):
    """A .pt2's graph calls ressurgeon's input check: module.py imports it (it was a NameError)."""
    code = tmp_path / "vgg_code"
    result = run("add-skips", example_models["vgg"], "-o", tmp_path / "out.pt2", "--save-code",
                 code)
    assert result.exit_code == 0, result.output
    source = (code / "module.py").read_text()
    assert "from ressurgeon.capture.exported import check_input as" in source
    assert 'torch.fx.wrap("ressurgeon_capture_exported_check_input")' in source
    assert "torch.load" not in source and "pickle" not in source
    x = torch.randn(3, 3, 32, 32)  # another batch size: the archive's batch is dynamic
    with torch.no_grad():
        expected = load_model(tmp_path / "out.pt2")(x)
    report = run_package(code, (x,), expected)
    assert report["diff"] <= ATOL and report["shape"] == [3, 10]


USER_LEAF = '''
import torch
import torch.nn as nn


class Scale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.s = nn.Parameter(torch.full((channels,), 1.5))

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


def build():
    layers = [nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)
'''


def test_user_leaf_is_refused_in_one_line_and_pickled_with_trust(tmp_path, monkeypatch):
    (tmp_path / "savecode_usernet.py").write_text(USER_LEAF)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = importlib.import_module("savecode_usernet").build()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    args = ["add-skips", tmp_path / "w.pt", "--arch", "savecode_usernet:build", "-i",
            "1,3,8,8", "--leaf", "Scale", "-o", tmp_path / "o.pt2", "--save-code"]
    line = one_line_error(run(*args, tmp_path / "code"))
    assert "cannot rebuild submodule '1' (savecode_usernet.Scale)" in line
    assert "--trust-pickle" in line
    assert not (tmp_path / "code").exists()

    result = run(*args, tmp_path / "code", "--trust-pickle")
    assert result.exit_code == 0, result.output
    source = (tmp_path / "code" / "module.py").read_text()
    assert "torch.load(_HERE / 'pickled_0.pt', weights_only=False)" in source
    assert "# --trust-pickle: pickled_0.pt is a pickle" in source
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = load_model(tmp_path / "o.pt2")(x)
    assert run_package(tmp_path / "code", (x,), expected, tmp_path)["diff"] <= ATOL


_SCALE = torch.tensor([2.0, 3.0, 4.0, 5.0])  # no attribute of the model: fx's _tensor_constant0


class _Tied(nn.Module):
    """Tied weights, a tensor constant, a non-persistent buffer and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("shift", torch.arange(4.0))

    def forward(self, x):
        return self.frozen(self.b(torch.relu(self.a(x))) * _SCALE + self.shift)


def test_tied_weights_constants_and_frozen_parameters_survive(tmp_path, monkeypatch):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Tied())
    gm.register_buffer("shift", gm.shift, persistent=False)
    # fx made the constant a buffer; an unlifted torch.export module keeps it a plain attribute
    gm.__dict__["_tensor_constant0"] = gm._buffers.pop("_tensor_constant0")
    folder = save_code(gm, tmp_path / "tied_code")
    from safetensors.torch import load_file

    stored = load_file(folder / "model.safetensors")
    assert "a.weight" in stored and "b.weight" not in stored  # tied: stored once
    constants = load_file(folder / "constants.safetensors")
    assert set(constants) == {"shift", "_tensor_constant0"}
    monkeypatch.syspath_prepend(str(tmp_path))
    rebuilt = importlib.import_module("tied_code").RewrittenModel()
    assert rebuilt.b.weight is rebuilt.a.weight
    assert not rebuilt.frozen.weight.requires_grad and rebuilt.a.weight.requires_grad
    assert "shift" not in rebuilt.state_dict()  # still non-persistent
    x = torch.randn(3, 4)
    assert torch.equal(rebuilt(x), gm(x))


def test_a_tampered_weight_changes_the_output(tmp_path, monkeypatch):
    """Negative control: the package's output comes from model.safetensors."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    x = torch.randn(4, 12)
    result = add_skips(mlp_changing_widths().eval(), (x,), SkipConfig())
    folder = save_code(result.module, tmp_path / "tampered_code")
    state = load_file(folder / "model.safetensors")
    state["0.weight"] = state["0.weight"] + 0.5
    save_file(state, folder / "model.safetensors")
    monkeypatch.syspath_prepend(str(tmp_path))
    rebuilt = importlib.import_module("tampered_code").RewrittenModel().eval()
    with torch.no_grad():
        assert (rebuilt(x) - result.module(x)).abs().max() > 1e-3


def _graph(target):
    root = nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(target, (x,)))
    return fx.GraphModule(root, graph)


def test_names_and_calls_are_checked_before_any_source_is_written(tmp_path):
    gm = _graph(torch.relu)
    gm.graph.find_nodes(op="placeholder")[0].target = "x=print('pwned')"
    with pytest.raises(UnsafeFileError, match="an input name written by --save-code"):
        save_code(gm, tmp_path / "code")
    with pytest.raises(ExportError, match="cannot import by name"):
        save_code(_graph(lambda v: v + 1), tmp_path / "code")
    assert not (tmp_path / "code").exists()
    folder = save_code(_graph(torch.relu), tmp_path / "code")  # the same graph, plain names
    assert "torch.relu(x)" in (folder / "module.py").read_text()


def test_dwa_rewired_model_captured_by_torch_export(tmp_path):
    """A DWA-rewired transformer (rewire keeps its class) goes through add_skips' torch.export
    capture; its graph (aten ops, input checks, the DWA weights as tensors) is written too."""
    from models import PreNormTransformer

    from ressurgeon import RewireConfig, rewire

    x = torch.randint(0, 64, (2, 8))
    rewired = rewire(PreNormTransformer().eval(), (x,), RewireConfig(kind="dwa")).module
    with torch.no_grad():
        for name, p in rewired.named_parameters():
            if "weights" in name:  # DWA's mixing weights away from the plain residual
                p.add_(0.1 * torch.randn_like(p))
    result = add_skips(rewired, (x,), SkipConfig())
    assert isinstance(result.module, fx.GraphModule)
    with torch.no_grad():
        expected = result.module(x)
    folder = save_code(result.module, tmp_path / "dwa_code")
    source = (folder / "module.py").read_text()
    assert "torch.load" not in source and "pickle" not in source
    assert run_package(folder, (x,), expected)["diff"] <= ATOL
    with torch.no_grad():
        assert (expected - rewired(x)).abs().max() <= ATOL  # the capture is the rewired model


def _ressurgeon_modules():
    from ressurgeon.deepen.insert import ResidualLayer
    from ressurgeon.recurrent import RecurrentStack
    from ressurgeon.shortcuts.concat import ConcatJoin
    from ressurgeon.shortcuts.add import Shortcut
    from ressurgeon.shortcuts.highway import HighwayShortcut
    from ressurgeon.shortcuts._graph import Fit

    h, x = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)
    proj = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    return {
        "add_morph": (Shortcut("morph", proj), (h, x)),
        "add_rezero": (Shortcut("rezero"), (h, h)),
        "highway": (HighwayShortcut("preserve", proj, nn.Conv2d(4, 8, 1, stride=2), 1), (h, x)),
        "concat": (ConcatJoin("preserve", 1, stride=2, spatial_dims=2), (h, x)),
        "fit": (Fit(channel_axis=1, spatial_dims=2), (x, h)),
        "stack": (RecurrentStack.from_packed(nn.GRU(4, 6, num_layers=3, dropout=0.2,
                                                    bidirectional=True)), (torch.randn(5, 2, 4),)),
        "residual_layer": (ResidualLayer(nn.Linear(4, 4), nn.Linear(4, 4), nn.GELU(),
                                         nn.LayerNorm(4)), (torch.randn(3, 4),)),
    }


@pytest.mark.parametrize("kind", list(_ressurgeon_modules()))
def test_each_ressurgeon_module_is_rebuilt_by_its_constructor_args(kind, tmp_path, monkeypatch):
    """A ressurgeon module kept whole in a graph (a leaf) is one constructor call in module.py."""
    torch.manual_seed(0)
    module, inputs = _ressurgeon_modules()[kind]
    module.eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.3 * torch.randn_like(p))  # open gates, non-zero new columns
    root = nn.Module()
    root.block = module
    graph = fx.Graph()
    args = [graph.placeholder(f"x{i}") for i in range(len(inputs))]
    out = graph.call_module("block", tuple(args))
    graph.output(out)
    gm = fx.GraphModule(root, graph).eval()
    folder = save_code(gm, tmp_path / f"{kind}_code")
    assert f"self.block = {type(module).__name__}(" in (folder / "module.py").read_text()
    monkeypatch.syspath_prepend(str(tmp_path))
    rebuilt = importlib.import_module(f"{kind}_code").RewrittenModel().eval()
    with torch.no_grad():
        a, b = gm(*inputs), rebuilt(*inputs)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert torch.equal(a, b)
    assert repr(rebuilt.block) == repr(module)


def test_dtypes_come_from_the_weights(tmp_path, monkeypatch):
    """Modules are built in the default dtype on the meta device; the loaded tensors keep theirs."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    result = add_skips(plain_cnn().double().eval(), (x,), SkipConfig(join="highway"))
    folder = save_code(result.module, tmp_path / "double_code")
    monkeypatch.syspath_prepend(str(tmp_path))
    rebuilt = importlib.import_module("double_code").RewrittenModel().eval()
    assert {p.dtype for p in rebuilt.parameters()} == {torch.float64}
    assert {b.dtype for b in rebuilt.buffers()} == {torch.float64, torch.int64}  # BN's counter
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.module(x))
