"""Loading never runs code from the file without --trust-pickle, and never inflates a zip bomb.

Each attack archive is built here from a clean ``torch.export.save`` archive.
Where the attack is live, a negative control loads it with torch's own
``torch.export.load`` and sees the payload run: the attack is real, and only
ressurgeon's loader stops it.
"""

import importlib
import io
import json
import os
import pickle
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from models import plain_cnn
from ressurgeon import LoadError, UnsafeFileError
from ressurgeon.cli import app
from ressurgeon.load import load_model

runner = CliRunner()


class RunsACommand:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def raw_pickle(marker) -> bytes:
    return pickle.dumps(RunsACommand(marker), protocol=2)


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_zip(path, members) -> None:
    """Members in the given order, names as given (duplicates included), stored uncompressed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: that is the attack
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members:
                z.writestr(name, data)


def read_zip(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def cli_refuses(path, tmp_path) -> str:
    """add-skips exits 2 with one line on stderr and writes nothing; returns the line."""
    out = tmp_path / "out.pt2"
    result = runner.invoke(app, ["add-skips", str(path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    return lines[0]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = plain_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, torch.export.export(model, (x,))


@pytest.fixture(scope="module")
def clean_pt2(cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "model.pt2"
    torch.export.save(cnn[2], path)
    return path


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    """An archive with a symbolic batch size: its shapes are stored as expressions."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ep = torch.export.export(model, (torch.randn(3, 4),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    path = tmp_path_factory.mktemp("dynamic") / "model.pt2"
    torch.export.save(ep, path)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a payload ran"


def root_of(members) -> str:
    return members[0][0].split("/", 1)[0] + "/"


def replace(members, suffix, data):
    hits = [i for i, (n, _) in enumerate(members) if n.endswith(suffix)]
    assert len(hits) == 1, suffix
    members[hits[0]] = (members[hits[0]][0], data)


def edit_config(members, suffix, edit):
    for i, (name, data) in enumerate(members):
        if name.endswith(suffix):
            config = json.loads(data)
            edit(config["config"])
            members[i] = (name, json.dumps(config).encode())
            return
    raise AssertionError(suffix)


def pickled_weight(payload):
    def build(members, marker):
        edit_config(members, "model_weights_config.json",
                    lambda c: c["0.0.weight"].update(use_pickle=True))
        replace(members, "data/weights/weight_0", payload(marker))
        return members
    return build


def pickled_constant(path_name, payload):
    def build(members, marker):
        root = root_of(members)
        config = f"{root}data/constants/model_constants_config.json"
        entry = {"path_name": path_name, "is_param": False, "use_pickle": True,
                 "tensor_meta": None}
        if any(n == config for n, _ in members):
            edit_config(members, config, lambda c: c.update(evil=entry))
        else:
            members.append((config, json.dumps({"config": {"evil": entry}}).encode()))
        members.append((f"{root}data/constants/{path_name}", payload(marker)))
        return members
    return build


def sample_inputs(payload, name="data/sample_inputs/model.pt"):
    def build(members, marker):
        root = root_of(members)
        members = [(n, d) for n, d in members if not n.endswith("data/sample_inputs/model.pt")]
        members.append((root + name, payload(marker)))
        return members
    return build


def added_member(name, payload):
    def build(members, marker):
        members.append((root_of(members) + name, payload(marker)))
        return members
    return build


def case_changed_weight(members, marker):
    """The weights folder spelt DATA/: torch's reader finds it, a case-sensitive scan does not."""
    members = pickled_weight(raw_pickle)(members, marker)
    return [(n.replace("/data/weights/weight_0", "/DATA/weights/weight_0"), d)
            for n, d in members]


def duplicated_sample_inputs(evil_first: bool, upper: bool):
    """Two sample-input members with one name (or names equal but for case). The readers
    disagree on which one counts: torch 2.13's took the later copy, Python's zipfile
    takes the last, a scan over the member list sees both."""
    def build(members, marker):
        i = next(i for i, (n, _) in enumerate(members) if n.endswith("sample_inputs/model.pt"))
        name = members[i][0].replace("model.pt", "MODEL.PT") if upper else members[i][0]
        evil = (name, saved(RunsACommand(marker)))
        return (members[:i] + [evil] + members[i:] if evil_first
                else members[:i + 1] + [evil] + members[i + 1:])
    return build


def legacy_members(ep, *, state_dict=None, constants=None, example_inputs=None,
                   state_dict_name="serialized_state_dict.pt",
                   constants_name="serialized_constants.pt"):
    """The pre-2.8 layout torch 2.5-2.7 wrote: a flat zip that torch.export.load still reads."""
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    artifact = serialize(ep)
    return [("version", ".".join(map(str, SCHEMA_VERSION)).encode()),
            ("serialized_exported_program.json", artifact.exported_program),
            (state_dict_name, state_dict if state_dict is not None else artifact.state_dict),
            (constants_name, constants if constants is not None else artifact.constants),
            ("serialized_example_inputs.pt",
             example_inputs if example_inputs is not None else artifact.example_inputs)]


def legacy_fallback(member):
    """Legacy members first, outside any folder: the current reader raises and torch falls
    back to the pre-2.8 reader, whose torch.load retries with weights_only=False."""
    def build(members, marker, ep):
        payload = raw_pickle(marker) if member.endswith(".json") else saved(RunsACommand(marker))
        names = {"serialized_state_dict.json": "state_dict", "serialized_constants.json":
                 "constants", "serialized_state_dict.pt": "state_dict",
                 "serialized_constants.pt": "constants",
                 "serialized_example_inputs.pt": "example_inputs"}
        kwargs = {names[member]: payload}
        if member.startswith("serialized_state_dict"):
            kwargs["state_dict_name"] = member
        if member.startswith("serialized_constants"):
            kwargs["constants_name"] = member
        return legacy_members(ep, **kwargs) + members  # archive_format etc. keep it a "pt2"
    return build


def graph_argument(target):
    """The first node's bias argument stored as an operator name, resolved by torch from any
    torch.* attribute: a higher-order op would call it when the graph runs."""
    def build(members, marker):
        i = next(i for i, (n, _) in enumerate(members) if n.endswith("models/model.json"))
        program = json.loads(members[i][1])
        node = program["graph_module"]["graph"]["nodes"][0]
        next(a for a in node["inputs"] if a["name"] == "bias")["arg"] = {"as_operator": target}
        members[i] = (members[i][0], json.dumps(program).encode())
        return members
    return build


def torchscript_bytes(marker):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def garbage(marker):
    return b"\x7fELF not really a library"


# (id, builder, live): live means torch.export.load runs the payload (the negative control).
PT2_ATTACKS = [
    ("weight marked use_pickle, raw pickle", pickled_weight(raw_pickle), True),
    ("weight marked use_pickle, torch.save", pickled_weight(lambda m: saved(RunsACommand(m))),
     True),
    ("weight marked use_pickle, TorchScript", pickled_weight(torchscript_bytes), False),
    ("tensor constant marked use_pickle",
     pickled_constant("tensor_0", lambda m: saved(RunsACommand(m))), True),
    ("opaque constant (pickle.loads)", pickled_constant("opaque_obj_0", raw_pickle), True),
    ("custom object (TorchBind pickle)", pickled_constant("custom_obj_0", raw_pickle), False),
    ("sample inputs", sample_inputs(lambda m: saved(RunsACommand(m))), True),
    ("sample inputs named MODEL.PT",
     sample_inputs(lambda m: saved(RunsACommand(m)), "data/sample_inputs/MODEL.PT"), True),
    ("weights folder named DATA/", case_changed_weight, True),
    ("legacy weights file data/weights/model.pt",
     added_member("data/weights/model.pt", lambda m: saved(RunsACommand(m))), True),
    ("legacy constants file data/constants/model.pt",
     added_member("data/constants/model.pt", lambda m: saved(RunsACommand(m))), True),
    ("AOTInductor library", added_member("data/aotinductor/model/model.so", garbage), False),
    ("graph argument naming torch.os.system", graph_argument("torch.os.system"), False),
    ("duplicate names, payload second", duplicated_sample_inputs(False, False), True),
    ("duplicate names, payload first", duplicated_sample_inputs(True, False), False),
    ("names equal but for case, payload second", duplicated_sample_inputs(False, True), True),
    ("names equal but for case, payload first", duplicated_sample_inputs(True, True), False),
]
LEGACY_ATTACKS = ["serialized_state_dict.json", "serialized_constants.json",
                  "serialized_state_dict.pt", "serialized_constants.pt",
                  "serialized_example_inputs.pt"]


def torch_runs_it(path, marker) -> bool:
    try:
        torch.export.load(path)
    except Exception:
        pass
    ran = marker.exists()
    if ran:
        marker.unlink()
    return ran


@pytest.mark.parametrize("case", PT2_ATTACKS, ids=[c[0] for c in PT2_ATTACKS])
def test_pt2_attack_runs_nothing(case, clean_pt2, tmp_path, marker):
    _, build, live = case
    evil = tmp_path / "evil.pt2"
    write_zip(evil, build(read_zip(clean_pt2), marker))
    if live:
        assert torch_runs_it(evil, marker), "negative control: the attack should be live"
    with pytest.raises(LoadError):
        load_model(evil)
    msg = cli_refuses(evil, tmp_path)
    assert "--trust-pickle" in msg or "resolve differently" in msg
    assert not marker.exists()


@pytest.mark.parametrize("member", LEGACY_ATTACKS)
def test_legacy_reader_fallback_runs_nothing(member, cnn, clean_pt2, tmp_path, marker):
    evil = tmp_path / "evil.pt2"
    write_zip(evil, legacy_fallback(member)(read_zip(clean_pt2), marker, cnn[2]))
    assert torch_runs_it(evil, marker), "negative control: the attack should be live"
    with pytest.raises(UnsafeFileError, match="would run code from the file"):
        load_model(evil)
    assert "--trust-pickle" in cli_refuses(evil, tmp_path)
    assert not marker.exists()


def test_shape_expression_cannot_run_code(dynamic_pt2, tmp_path, marker):
    """torch parses stored shape expressions with sympy.sympify, which calls eval."""
    members = read_zip(dynamic_pt2)
    i = next(i for i, (n, _) in enumerate(members) if n.endswith("models/model.json"))
    text = members[i][1].decode()
    symbol = json.loads('"' + text.split('"expr_str": "', 1)[1].split('"', 1)[0] + '"')
    code = f"__import__('os').system('touch {marker}')"
    members[i] = (members[i][0], text.replace(f'"expr_str": "{symbol}"',
                                              f'"expr_str": {json.dumps(code)}', 1).encode())
    evil = tmp_path / "evil.pt2"
    write_zip(evil, members)
    assert torch_runs_it(evil, marker), "negative control: the attack should be live"
    with pytest.raises(UnsafeFileError, match="shape expression"):
        load_model(evil)
    cli_refuses(evil, tmp_path)
    assert not marker.exists()


def test_tree_spec_cannot_import_a_module(clean_pt2, tmp_path, marker, monkeypatch):
    """pytree specs in the archive name module:attribute for enums; torch imports the module."""
    (tmp_path / "probe_side_effect.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    members = read_zip(clean_pt2)
    i = next(i for i, (n, _) in enumerate(members) if n.endswith("models/model.json"))
    program = json.loads(members[i][1])
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(signature["in_spec"])
    spec[1]["context"] = json.dumps({"__enum__": True, "fqn": "probe_side_effect:Color",
                                     "name": "RED"})
    signature["in_spec"] = json.dumps(spec)
    members[i] = (members[i][0], json.dumps(program).encode())
    evil = tmp_path / "evil.pt2"
    write_zip(evil, members)
    assert torch_runs_it(evil, marker), "negative control: the attack should be live"
    monkeypatch.delitem(sys.modules, "probe_side_effect")
    with pytest.raises(UnsafeFileError, match="tree spec that looks up 'probe_side_effect"):
        load_model(evil)
    cli_refuses(evil, tmp_path)
    # the second door: during the load, only torch's or already imported modules import
    from ressurgeon._refuse_code import refuse_code_execution

    with pytest.raises(RuntimeError), refuse_code_execution() as refused:
        importlib.import_module("probe_side_effect")
    assert refused == ["an import of probe_side_effect"]
    assert not marker.exists()


def test_clean_archives_still_load(cnn, clean_pt2, dynamic_pt2):
    model, x, _ = cnn
    torch.testing.assert_close(load_model(clean_pt2).eval()(x), model(x), rtol=0, atol=0)
    dynamic = load_model(dynamic_pt2)
    assert dynamic(torch.randn(5, 4)).shape == (5, 2)


def test_pre_2_8_archive_without_pickles_loads(cnn, tmp_path):
    """torch 2.5-2.7 wrote a flat zip (version, serialized_*.pt/json); torch.export.load
    still reads it with its legacy reader. Built here with today's serializer, in that layout."""
    model, x, ep = cnn
    path = tmp_path / "old.pt2"
    write_zip(path, legacy_members(ep))
    torch.testing.assert_close(load_model(path).eval()(x), model(x), rtol=0, atol=0)


def test_context_restores_every_entry_point():
    import _pickle

    import sympy

    from ressurgeon._refuse_code import refuse_code_execution

    def entry_points():
        return (pickle.loads, pickle.Unpickler, _pickle.loads, torch.load,
                torch.serialization.load, torch.jit.load, torch._C._pickle_load_obj,
                sympy.sympify, vars(torch.ops).get("load_library"))

    before = entry_points()
    with pytest.raises(RuntimeError), refuse_code_execution() as refused:
        pickle.loads(pickle.dumps(1))
    assert refused == ["a Python pickle"]
    assert entry_points() == before
    assert pickle.loads(pickle.dumps([1])) == [1]


def deflated_zeros(path, members: dict[str, int]) -> None:
    """A zip whose members are runs of zeros, deflated on the fly (never held in memory)."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, size in members.items():
            with z.open(name, "w", force_zip64=True) as f:
                for _ in range(size >> 20):
                    f.write(chunk)


@pytest.mark.parametrize("layout", ["one big member", "many small members"])
def test_zip_bomb_is_refused_before_inflating(layout, tmp_path, monkeypatch):
    members = ({"bomb/data/weights/weight_0": 64 << 20} if layout == "one big member"
               else {f"bomb/data/weights/weight_{i}": 3 << 20 for i in range(30)})
    path = tmp_path / "bomb.pt2"
    deflated_zeros(path, members)
    assert path.stat().st_size < sum(members.values()) / 200

    def inflates(*args, **kwargs):
        raise AssertionError("the archive was inflated")

    monkeypatch.setattr(zipfile.ZipFile, "testzip", inflates)
    monkeypatch.setattr(zipfile.ZipFile, "read", inflates)
    monkeypatch.setattr(torch.export, "load", inflates)
    monkeypatch.setattr(torch, "load", inflates)
    with pytest.raises(LoadError, match="zip bomb.*than 200:1"):
        load_model(path)
    monkeypatch.undo()
    assert "zip bomb" in cli_refuses(path, tmp_path)


def test_empty_member_cannot_claim_gigabytes_of_zeros(clean_pt2, tmp_path, monkeypatch):
    """torch.export.load fills a tensor whose member is empty with torch.zeros(sizes from
    the config): a few bytes would otherwise allocate 16 GiB."""
    members = read_zip(clean_pt2)
    replace(members, "data/weights/weight_0", b"")
    edit_config(members, "model_weights_config.json", lambda c: c["0.0.weight"]["tensor_meta"]
                .update(sizes=[{"as_int": 1 << 16}, {"as_int": 1 << 16}]))
    path = tmp_path / "zeros.pt2"
    write_zip(path, members)

    def allocates(*args, **kwargs):
        raise AssertionError("torch.export.load was reached")

    monkeypatch.setattr(torch.export, "load", allocates)
    with pytest.raises(LoadError, match="claims 32.0 GiB of tensors that its empty members"):
        load_model(path)


def test_recompressed_archive_is_no_bomb(cnn, clean_pt2, tmp_path):
    """A user who zips a .pt2 again with deflate gets ordinary ratios: it still loads."""
    model, x, _ = cnn
    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in read_zip(clean_pt2):
            z.writestr(name, data)
    torch.testing.assert_close(load_model(path).eval()(x), model(x), rtol=0, atol=0)


# --- pickles that name only allowlisted torch.nn classes -----------------------------------

def torch_save_with_pickle(path, data_pkl: bytes) -> None:
    """A torch.save zip whose data.pkl is replaced by hand-written pickle bytes."""
    buffer = io.BytesIO()
    torch.save(nn.Linear(1, 1), buffer)
    buffer.seek(0)
    members = [(n, data_pkl if n.endswith("/data.pkl") else d) for n, d in read_zip(buffer)]
    write_zip(path, members)


CONV = b"ctorch.nn.modules.conv\nConv2d\n"


def hook_is_system(marker) -> bytes:
    """Conv2d rebuilt with NEWOBJ, then BUILD with a state whose forward hook is os.system."""
    return (b"\x80\x02" + CONV + b")\x81}X\x0e\x00\x00\x00_forward_hooks}K\x00cposix\nsystem\n"
            b"ssb.")


NN_ATTACKS = {
    # REDUCE: calling the allowlisted class runs its __init__ with arguments from the file
    "REDUCE Conv2d(...)": lambda m: b"\x80\x02" + CONV + b"(K\x03K\x08K\x03tR.",
    "REDUCE Linear of terabytes": lambda m: (
        b"\x80\x02ctorch.nn.modules.linear\nLinear\n(J\x00\x00\x10\x00J\x00\x00\x10\x00tR."),
    # NEWOBJ with arguments
    "NEWOBJ Conv2d with arguments": lambda m: b"\x80\x02" + CONV + b"K\x03\x85\x81.",
    # BUILD setting a hook to os.system
    "BUILD hook os.system": hook_is_system,
    # an nn module whose state holds a reduce payload
    "Conv2d holding a payload": lambda m: pickle.dumps(
        _conv_with(RunsACommand(m)), protocol=2),
    # REDUCE os.system directly, after an allowlisted GLOBAL
    "GLOBAL Conv2d then REDUCE system": lambda m: (
        b"\x80\x02" + CONV + b"0cposix\nsystem\nX" + len(f"touch {m}").to_bytes(4, "little")
        + f"touch {m}".encode() + b"\x85R."),
}


def _conv_with(payload):
    conv = nn.Conv2d(1, 1, 1)
    conv.payload = payload
    return conv


@pytest.mark.parametrize("attack", NN_ATTACKS)
def test_allowlisted_class_cannot_carry_a_payload(attack, tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch_save_with_pickle(path, NN_ATTACKS[attack](marker))
    with pytest.raises(UnsafeFileError, match="needs full unpickling"):
        load_model(path)
    msg = cli_refuses(path, tmp_path)
    assert "--trust-pickle" in msg
    assert not marker.exists()


def test_rebuilt_torch_nn_module_is_the_real_class(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LSTM(4, 4), nn.TransformerEncoderLayer(8, 2, 16),
                          nn.TransformerDecoderLayer(8, 2, 16, activation="gelu"))
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    layer, x = loaded[5].eval(), torch.randn(3, 2, 8)
    torch.testing.assert_close(layer(x), model[5].eval()(x), rtol=0, atol=0)
