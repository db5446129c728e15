"""Training checkpoints load with --arch: the state_dict inside is found, prefixes stripped.

The layouts of the PyTorch tutorial, timm's train.py, Lightning and DDP, built here
(timm and Lightning are not installed: their classes are stood in by modules of the same
name, registered only while the file is written, as a training script's process has them).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ressurgeon import load_model
from ressurgeon.errors import LoadError, UnsafeFileError

ARCH_MODULE = "ckpt_arch_for_tests"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2))


@pytest.fixture
def arch(tmp_path, monkeypatch):
    (tmp_path / f"{ARCH_MODULE}.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), "
        "nn.Flatten(), nn.Linear(4 * 6 * 6, 2))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, ARCH_MODULE, raising=False)
    return f"{ARCH_MODULE}:build"


def trained() -> tuple[nn.Module, dict]:
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, model.state_dict()


def optimizer_state(model) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


def load(path, arch, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path, arch=arch, **kw)
    notes = [str(w.message) for w in caught if type(w.message).__name__ == "CheckpointNote"]
    return model, notes


def same(model, reference) -> bool:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    return torch.equal(model.eval()(x), reference.eval()(x))


def test_pytorch_tutorial_layout(tmp_path, arch):
    model, sd = trained()
    torch.save({"epoch": 3, "model_state_dict": sd,
                "optimizer_state_dict": optimizer_state(net()), "loss": 0.25},
               tmp_path / "ckpt.pt")
    loaded, notes = load(tmp_path / "ckpt.pt", arch)
    assert same(loaded, model)
    assert notes == [f"{tmp_path / 'ckpt.pt'}: loaded the state_dict under key "
                     "'model_state_dict'"]


@pytest.fixture
def fake_lightning(monkeypatch):
    """Lightning's AttributeDict, under its own module path, as a training process has it."""
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities",
             "lightning.fabric.utilities.data"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = names[-1], "AttributeDict"
    sys.modules[names[-1]].AttributeDict = AttributeDict
    yield AttributeDict


def test_timm_layout_with_args_namespace_and_ema(tmp_path, arch):
    model, sd = trained()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"epoch": 9, "arch": "tiny", "state_dict": sd, "state_dict_ema": ema,
                "optimizer": optimizer_state(net()), "version": 2, "metric": 71.5,
                "args": argparse.Namespace(lr=0.1, model="tiny", epochs=10, amp=True)},
               tmp_path / "last.pth.tar")
    loaded, notes = load(tmp_path / "last.pth.tar", arch)
    assert same(loaded, model)
    assert "key 'state_dict'" in notes[0] and "'state_dict_ema'" in notes[0]
    ema_model, notes = load(tmp_path / "last.pth.tar", arch, key="state_dict_ema")
    assert torch.equal(ema_model.state_dict()["0.weight"], ema["0.weight"])


def test_lightning_layout_strips_the_model_prefix(tmp_path, arch, fake_lightning):
    model, sd = trained()
    hparams = fake_lightning(lr=1e-3, layers=[4, 2])
    torch.save({"epoch": 1, "global_step": 40, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in sd.items()},
                "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": 1}}},
                "callbacks": {"ModelCheckpoint{'monitor': None}": {
                    "best_model_path": "x.ckpt", "best_model_score": torch.tensor(0.5)}},
                "optimizer_states": [optimizer_state(net())], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": hparams},
               tmp_path / "epoch=1.ckpt")
    for name in [n for n in sys.modules if n.startswith("lightning")]:
        del sys.modules[name]   # loading must not need lightning
    loaded, notes = load(tmp_path / "epoch=1.ckpt", arch)
    assert same(loaded, model)
    assert notes == [f"{tmp_path / 'epoch=1.ckpt'}: loaded the state_dict under key "
                     "'state_dict', prefix 'model.' stripped from its keys"]


def test_ddp_module_prefix_on_a_bare_state_dict(tmp_path, arch):
    model, sd = trained()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    loaded, notes = load(tmp_path / "ddp.pt", arch)
    assert same(loaded, model)
    assert notes == [f"{tmp_path / 'ddp.pt'}: loaded prefix 'module.' stripped from its keys"]


def test_a_prefix_is_kept_when_the_rest_would_not_match(tmp_path, arch):
    _, sd = trained()
    torch.save({f"module.{k}": v for k, v in list(sd.items())[:-1]}, tmp_path / "part.pt")
    with pytest.raises(LoadError, match="do not fit"):
        load_model(tmp_path / "part.pt", arch=arch)


def test_several_state_dicts_and_no_usual_key_need_key(tmp_path, arch):
    _, sd = trained()
    torch.save({"student": sd, "teacher": sd}, tmp_path / "two.pt")
    with pytest.raises(LoadError, match="several state_dicts.*'student'.*--key"):
        load_model(tmp_path / "two.pt", arch=arch)
    loaded, notes = load(tmp_path / "two.pt", arch, key="teacher")
    assert "key 'teacher'" in notes[0]
    with pytest.raises(LoadError, match="--key nope: .* no entry 'nope'"):
        load_model(tmp_path / "two.pt", arch=arch, key="nope")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_other_classes_are_still_refused_and_stand_ins_cannot_be_called(tmp_path, arch):
    _, sd = trained()
    torch.save({"state_dict": sd, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError):
        load_model(tmp_path / "evil.pt", arch=arch)
    assert not Path("pwned.txt").exists()
    # a pickle that *calls* argparse.Namespace (REDUCE) instead of rebuilding it is refused
    import pickle

    class CallNamespace:
        def __reduce__(self):
            return (argparse.Namespace, (), None)

    payload = {"state_dict": sd, "args": CallNamespace()}
    torch.save(payload, tmp_path / "call.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises((UnsafeFileError, LoadError)):
        load_model(tmp_path / "call.pt", arch=arch)


def test_cli_add_skips_on_a_checkpoint(tmp_path, arch):
    from typer.testing import CliRunner

    from ressurgeon.cli import app

    model, sd = trained()
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}},
               tmp_path / "ckpt.pt")
    result = CliRunner().invoke(app, ["add-skips", str(tmp_path / "ckpt.pt"), "--arch", arch,
                                      "--input-shape", "1,3,8,8", "--span", "1", "-o",
                                      str(tmp_path / "out.pt2")])
    assert result.exit_code == 0, result.output
    assert "key 'model_state_dict', prefix 'module.' stripped" in result.output
