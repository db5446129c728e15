"""What a run that changes nothing says and writes; the CLI and the Python API agree."""

from __future__ import annotations

import json

import torch
import torch.nn as nn
from typer.testing import CliRunner

from ressurgeon import load_model
from ressurgeon.cli import app
from tests.models import ResNetLike


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_model_with_residuals_is_written_unchanged_and_told_to_use_deepen(tmp_path):
    torch.manual_seed(0)
    model, x = ResNetLike().eval(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "resnet.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    out = tmp_path / "o.pt2"
    result = run("add-skips", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inserted"] == 0 and report["skips"] == [] and report["output"] == str(out)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no shortcut inserted" in lines[0]
    assert "residual connection" in lines[0] and "ressurgeon deepen" in lines[0]
    written = load_model(out).eval()
    assert torch.equal(written(x), model(x))     # the next step of a pipeline reads it


def test_no_candidate_plain_model_says_why_and_writes(tmp_path):
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(2, 4),)), path)
    result = run("add-skips", path, "-o", tmp_path / "o.pt2", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["inserted"] == 0
    assert "no shortcut inserted" in result.stderr and "--span" in result.stderr
    assert (tmp_path / "o.pt2").exists()
    quiet = run("add-skips", path, "-o", tmp_path / "q.pt2", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def classifier_heavy() -> nn.Sequential:
    """A 512 -> 2048 projection: 1.05M parameters, 76% of the model's 1.37M."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 10)).eval()


def test_projections_over_a_tenth_of_the_model_are_skipped_by_default(tmp_path):
    from ressurgeon import SkipConfig, add_skips
    from ressurgeon.verdicts import Reason

    model, x = classifier_heavy(), torch.randn(2, 64)
    total = sum(p.numel() for p in model.parameters())
    unlimited = add_skips(model, (x,), SkipConfig(span=1, max_projection_share=None))
    big = [s for s in unlimited.skips if s.params > 0.25 * total and s.params >= 2 ** 20]
    assert big, "the fixture must have a projection over 25% of the parameters"
    default = add_skips(model, (x,), SkipConfig(span=1))
    assert all(s.params <= 0.25 * total for s in default.skips)
    skipped = [s for s in default.spans if s.reason is Reason.LARGE_PROJECTION]
    assert {(s.source_layer, s.target_layer) for s in skipped} == \
        {(s.source_layer, s.target_layer) for s in big}
    assert "--max-projection-share" in Reason.LARGE_PROJECTION.text
    path = tmp_path / "heavy.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    said = run("add-skips", path, "--span", "1", "-o", tmp_path / "o.pt2")
    assert said.exit_code == 0 and "--max-projection-share" in said.stderr   # the flag is named
    report = json.loads(run("add-skips", path, "--span", "1", "--json", "-o",
                            tmp_path / "o.pt2").stdout)
    assert report["inserted"] == len(default.skips)
    assert any(r["reason"] == "large-projection" for r in report["rejected"])
    allowed = json.loads(run("add-skips", path, "--span", "1", "--json", "-o", tmp_path / "a.pt2",
                             "--max-projection-share", "0").stdout)
    assert allowed["inserted"] == len(unlimited.skips)


def test_seed_makes_the_projection_weights_reproducible(tmp_path):
    from ressurgeon import SkipConfig, add_skips

    model, x = classifier_heavy(), torch.randn(2, 64)
    config = SkipConfig(span=1, max_projection_share=None, seed=7)
    torch.manual_seed(1)
    a = add_skips(model, (x,), config).module.state_dict()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = add_skips(model, (x,), config).module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)      # the global RNG is left alone
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = add_skips(model, (x,), SkipConfig(span=1, max_projection_share=None, seed=8))
    assert any(not torch.equal(a[k], v) for k, v in other.module.state_dict().items()
               if k.endswith("proj.weight"))
    path = tmp_path / "heavy.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    for run_dir in ("one", "two"):   # one file name: a .pt2's members are named after it
        (tmp_path / run_dir).mkdir()
        assert run("add-skips", path, "--span", "1", "--seed", "3", "-o",
                   tmp_path / run_dir / "out.pt2").exit_code == 0
    one, two = (load_model(tmp_path / n / "out.pt2").state_dict() for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # (not byte-identical: torch.export writes a random serialization_id and object ids)


def test_cli_defaults_are_the_config_defaults():
    """Every CLI option named after a config field defaults to that field's default."""
    import dataclasses

    import typer

    from ressurgeon.config import DeepenConfig, RewireConfig, SkipConfig, TraceOptions

    defaults: dict[str, list] = {}
    for cls in (SkipConfig, TraceOptions, DeepenConfig, RewireConfig):
        for f in dataclasses.fields(cls):
            value = getattr(f.default, "value", f.default)
            defaults.setdefault(f.name, []).append(None if value == () else value)
    aliases = {"leaf": "leaf_modules", "concrete": "concrete_args"}
    # diagnose measures gradient flow, which a closed (preserve) gate would not change
    intended = {("diagnose", "init"), ("diagnose", "seed")}
    differ, checked = [], 0
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            field = aliases.get(param.name, param.name)
            if field not in defaults or (name, param.name) in intended:
                continue
            checked += 1
            default = None if param.default in ((), []) else param.default
            if all(str(default) != str(d) for d in defaults[field]):
                differ.append((name, param.name, param.default, defaults[field]))
    assert checked >= 20 and differ == []


def test_python_and_cli_insert_the_same_skips_on_one_archive(tmp_path):
    from ressurgeon import add_skips
    from tests.models import plain_cnn

    torch.manual_seed(0)
    model, x = plain_cnn().eval(), torch.randn(1, 3, 32, 32)
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    python = add_skips(load_model(path), (x,))
    cli = json.loads(run("add-skips", path, "--json", "-o", tmp_path / "o.pt2").stdout)
    assert cli["config"] == python.plan.config.to_dict()
    assert [(s["source_layer"], s["target_layer"], s["kind"]) for s in cli["skips"]] == \
        [(s.source_layer, s.target_layer, s.kind) for s in python.skips]
