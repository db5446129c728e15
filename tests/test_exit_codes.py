"""Bad input is exit 2 and one line naming what is wrong; never a traceback (exit 1) or a box.

Each crafted file is built here, in code; every case runs the CLI in-process
(typer's CliRunner) except one real subprocess for the console entry point.
"""

import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import one_line_error, run_cli as run


@pytest.mark.parametrize("args, says", [
    (["inspect", "--bogus", "{mlp}"], "No such option: --bogus"),
    (["inspect"], "Missing argument 'model'"),
    (["inspect", "{mlp}", "--vocab", "abc"], "Invalid value for '--vocab'"),
    (["inspect", "{mlp}", "--vocab", "10^23"], "Invalid value for '--vocab'"),
    (["add-skips", "{mlp}", "--span", "two"], "Invalid value for '--span'"),
])
def test_usage_errors_are_one_line_with_the_fix(example_models, args, says):
    result = run(*[a.format(mlp=example_models["mlp"]) for a in args])
    line = one_line_error(result)
    assert says in line
    assert line.endswith("--help") and "╭" not in result.output  # the fix, no box
    assert "Usage:" not in result.output


def test_usage_error_through_the_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ressurgeon", "inspect", "--no-such-flag", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No such option: --no-such-flag"), \
        proc.stderr
    assert lines[0].endswith("inspect --help")


def test_help_and_version_still_exit_0():
    assert run("--help").exit_code == 0
    assert run("inspect", "--help").exit_code == 0
    assert run("--version").exit_code == 0


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "emb.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)), path)
    return path


@pytest.mark.parametrize("vocab", [str(10 ** 23), str(2 ** 31), "0", "-5"])
def test_vocab_out_of_range_is_exit_2(embedding_model, vocab):
    line = one_line_error(run("inspect", embedding_model, "-i", "1,4:int64", "--vocab", vocab))
    assert "--vocab" in line and "between 1 and 2147483647" in line


def test_plan_with_a_5000_digit_integer(example_models, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": ' + "9" * 5000 + ', "skips": []}')
    line = one_line_error(run("add-skips", example_models["mlp"], "--plan", plan,
                              "-o", tmp_path / "o.pt2"))
    assert "number too long" in line and "plan" in line
    assert not (tmp_path / "o.pt2").exists()


def test_config_json_nested_100k_deep(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "model.safetensors").write_bytes(b"")
    line = one_line_error(run("inspect", folder))
    assert "config.json" in line and "not valid JSON" in line


def _torch_save_bytes(tmp_path) -> bytes:
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), path)
    return path.read_bytes()


def test_zip64_end_record_on_disk_1(example_models, tmp_path):
    raw = example_models["mlp"].read_bytes()
    end = raw.rfind(b"PK\x05\x06")
    locator = b"PK\x06\x07" + struct.pack("<IQI", 1, 0, 2)  # the zip64 end record on disk 1
    bad = tmp_path / "disk1.pt2"
    bad.write_bytes(raw[:end] + locator + raw[end:])
    line = one_line_error(run("inspect", bad))
    assert "span multiple disks" in line and "corrupted" not in line


def test_member_name_not_utf8(tmp_path):
    raw = bytearray(_torch_save_bytes(tmp_path))
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        name = z.infolist()[0].filename.encode()
    raw = raw.replace(name, b"\xff" + name[1:])
    for sig, flag_at in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):  # flag the names as UTF-8
        at = raw.find(sig)
        while at >= 0:
            struct.pack_into("<H", raw, at + flag_at,
                             struct.unpack_from("<H", raw, at + flag_at)[0] | 0x800)
            at = raw.find(sig, at + 4)
    bad = tmp_path / "badname.pt"
    bad.write_bytes(bytes(raw))
    line = one_line_error(run("inspect", bad))
    assert "file name is not valid UTF-8" in line and "corrupted" not in line


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_refused_pickle_names_what_it_references(tmp_path, writer):
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(_Payload(), path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(_Payload()))
    line = one_line_error(run("inspect", path))
    assert "refused: the pickle references" in line and ".system" in line
    assert "corrupted" not in line


def test_plan_json_still_reads_after_the_checks(example_models, tmp_path):
    """The new refusals do not touch a normal plan: dry run, then the plan applies."""
    plan = tmp_path / "plan.json"
    assert run("add-skips", example_models["mlp"], "--dry-run", "--plan-out", plan).exit_code == 0
    assert json.loads(plan.read_text())["skips"]
    result = run("add-skips", example_models["mlp"], "--plan", plan, "-o", tmp_path / "o.pt2")
    assert result.exit_code == 0, result.output
