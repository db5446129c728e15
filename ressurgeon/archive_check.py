"""Check a ``.pt2`` archive's serialized program against an allowlist before torch reads it.

``torch.export.load`` turns strings from the archive into Python source that
torch.fx generates and ``exec``s: a placeholder's target becomes a parameter
of ``def forward(...)``, a parameter's path goes into ``getattr(self, "...")``,
an input spec's dict keys into a quoted literal, the archive's ``guards_code``
into a function body. Scanning those strings for known bad ones cannot be
complete; this module instead reads the program JSON itself (with ``json``
and ``zipfile`` only: nothing here deserialises or imports anything the file
names) and accepts it only when every field has a shape that cannot be code:

- every node name, placeholder, argument name, graph-signature path
  (parameters, buffers, constants, user inputs and outputs, mutations), module
  call-graph path, constant name, payload path and every metadata string that
  becomes a name (``nn_module_stack`` paths and classes, ``source_fn_stack``)
  is an identifier or a dotted path of identifiers and indices (``_names``);
- every call target, and every operator passed as an argument, is one that
  torch.export's serializer writes and loading cannot turn into code:
  ``torch.ops.aten|prims.<op>.<overload>``, ``torch.ops.higher_order.<op>``,
  the symbolic-size operators (``_operator.mul``, ``math.trunc``,
  ``torch.sym_max`` ...);
- every symbolic shape expression parses (Python ``ast``, never evaluated) as
  arithmetic over symbols and integers, bounded in length, node count and in
  the size of the numbers it can make (no power towers);
- every stored tensor fits the bytes its record holds (sizes, strides and
  offset), and a tensor that would materialise to much more than it stores
  (stride 0, or an empty record filled with zeros) is capped;
- nothing that loads by unpickling: ``use_pickle`` payloads, TorchBind and
  opaque objects.

The archive's ``guards_code`` (Python source) is never run for an untrusted
file: ``drop_guards_code`` empties it on the loaded program before
``ep.module()`` would compile it; the range checks torch derives from
``range_constraints`` (data, checked here) remain.

Anything else raises ``UnsafeFileError``: one line naming the member, the
field and the value. ``capture_ranges`` returns the archive's symbol ranges as
plain data, for checks built from data instead of executed code.
"""

from __future__ import annotations

import ast
import builtins
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ._names import MAX_PART, is_class_name, is_fqn, is_identifier, shown
from .errors import LoadError, UnsafeFileError

log = logging.getLogger(__name__)

FIX = ("write the archive again with torch.export.save from the model, or pass --trust-pickle "
       "only for files you made yourself")

# Call targets: what torch.export's serializer writes (serialize_operator, _SYM_OPS).
OP_NAMESPACES = ("aten", "prims")
_OP = re.compile(r"torch\.ops\.(?P<ns>[A-Za-z_]\w*)\.(?P<op>[A-Za-z_]\w*)\.(?P<ovl>[A-Za-z_]\w*)")
_LITERAL = re.compile(r"[ !#-&(-\[\]-~]{0,1000}")  # printable ASCII but ' " \\
_HIGHER_ORDER = re.compile(r"torch\.ops\.higher_order\.[A-Za-z_]\w*")
SYMBOLIC_OPS = frozenset(
    [f"_operator.{n}" for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
                               "pos", "eq", "ne", "le", "ge", "lt", "gt", "and_", "or_",
                               "lshift", "rshift", "getitem", "not_", "abs")]
    + [f"math.{n}" for n in ("trunc", "ceil", "floor", "sqrt")]
    + [f"torch.{n}" for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max",
                              "sym_min", "sym_sqrt", "sym_sum")])

# Bounds. A real model's program stays far below each.
MAX_JSON_BYTES = 1 << 30        # one program or payload config
MAX_DEPTH = 64                  # nested graphs, treespecs, arguments
MAX_STRING = 1 << 20            # any one string value (stack traces included)
MAX_DIM = 1 << 40               # one size, stride or offset
MAX_ELEMENTS = 1 << 40          # elements of one tensor
EXPANSION_FACTOR = 4            # a stored tensor may materialise to this times its bytes...
EXPANSION_CAP = 64 << 20        # ...or, past that, to this many bytes in all (stride 0, zeros)
MAX_EXPR_CHARS = 10_000         # one symbolic expression
MAX_EXPR_NODES = 2_000
MAX_EXPR_BITS = 4_096           # the largest number an expression can make, in bits
MAX_EXPONENT = 64

# Element sizes of torch.export's ScalarType codes (torch/_export/serde/schema.py).
ELEMENT_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1,
                13: 2, 28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
LAYOUTS = frozenset(range(8))
STRIDED = 7


@dataclass(frozen=True)
class ArchiveFacts:
    """What a checked archive holds that the loader needs.

    ``names``: every dotted name (and each of its prefixes) that appears in a
    string of the program, the module names a file could ask torch to import.
    ``ranges``: symbol -> (min, max) from ``range_constraints`` (None: unbounded).
    ``guards_code``: how many guard lines the archive carries (never run untrusted).
    """

    names: frozenset[str] = frozenset()
    ranges: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    guards_code: int = 0


def check_archive(path: str | Path) -> ArchiveFacts:
    """Validate every program and payload config of a ``.pt2`` archive; read nothing else.

    Args:
        path: a zip archive already checked for bombs and duplicate names.

    Returns:
        ArchiveFacts: the names the program mentions, its symbol ranges, and
        how many lines of guards code it carries.

    Raises:
        UnsafeFileError: a field outside the allowlist (names the member, the
            field and the value).
        LoadError: the archive has no program this version knows.

    Example:
        >>> facts = check_archive("vgg.pt2")   # doctest: +SKIP
        >>> facts.ranges                        # doctest: +SKIP
        {'s77': (1, None)}
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            sizes = {i.filename.casefold(): i.file_size for i in infos}
            programs = [i for i in infos if _is_program(i.filename)]
            configs = [i for i in infos if _is_payload_config(i.filename)]
            if not programs:
                raise LoadError(f"{path} holds no serialized program that this version of "
                                "ressurgeon knows (models/*.json); write it again with "
                                "torch.export.save")
            checker = _Checker(path)
            for info in programs:
                checker.program(info.filename, _read_json(z, info, path))
            for info in configs:
                checker.payload_config(info.filename, _read_json(z, info, path), sizes)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise LoadError(f"{path} is a damaged zip archive ({exc}); write it again") from exc
    return ArchiveFacts(names=frozenset(checker.names), ranges=dict(checker.ranges),
                        guards_code=checker.guards)


def capture_ranges(path: str | Path) -> dict[str, tuple[int | None, int | None]]:
    """The archive's ``range_constraints`` as data: symbol -> (min, max), None for unbounded.

    Read from the JSON after the whole archive passed ``check_archive``;
    nothing is evaluated. Example: ``{'s77': (5, 64)}``.
    """
    return check_archive(path).ranges


def drop_guards_code(ep, path: str | Path) -> None:
    """Empty a loaded program's ``guards_code`` (Python source from the file) before
    ``ep.module()`` compiles it; torch still checks the inputs against the archive's
    ``range_constraints``, which are data."""
    guards = getattr(ep, "_guards_code", None)
    if guards:
        log.debug("%s: not running the %d lines of guards code the archive carries "
                  "(Python source from the file); input ranges are still checked",
                  path, len(guards))
        ep._guards_code = []


# -- the archive's members -------------------------------------------------------------------

def _is_program(name: str) -> bool:
    key = name.casefold()
    return key.endswith(".json") and ("/" + key).rsplit("/", 2)[-2:-1] == ["models"] or \
        key.rsplit("/", 1)[-1] == "serialized_exported_program.json"


def _is_payload_config(name: str) -> bool:
    key = name.casefold()
    parts = key.split("/")
    return (len(parts) >= 3 and parts[-3] == "data" and parts[-2] in ("weights", "constants")
            and parts[-1].endswith(("_weights_config.json", "_constants_config.json")))


def _read_json(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path):
    if info.file_size > MAX_JSON_BYTES:
        raise UnsafeFileError(f"{path}: refused: {info.filename} is {info.file_size} bytes of "
                              f"JSON (at most {MAX_JSON_BYTES}); {FIX}")
    try:
        text = z.read(info).decode("utf-8")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsafeFileError(f"{path}: refused: {info.filename} is not JSON this version "
                              f"reads ({type(exc).__name__}: {str(exc)[:60]}); {FIX}") from exc


# -- the allowlist ---------------------------------------------------------------------------

class _Checker:
    """Walks one archive's JSON; ``field`` arguments are readable paths for the message."""

    def __init__(self, path: Path):
        self.path = path
        self.member = ""
        self.names: set[str] = set()
        self.ranges: dict[str, tuple[int | None, int | None]] = {}
        self.guards = 0
        self.made_up = 0  # bytes materialised beyond what records store, whole archive

    def fail(self, field: str, value: object, wanted: str) -> UnsafeFileError:
        return UnsafeFileError(f"{self.path}: refused: {self.member} {field} is {shown(value)}, "
                               f"not {wanted}; {FIX}")

    # generic shapes

    def obj(self, value, field: str, keys: frozenset[str], required: frozenset[str] = frozenset()):
        if not isinstance(value, dict):
            raise self.fail(field, value, "an object")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise self.fail(f"{field} field", unknown[0],
                            f"one of the fields this version reads ({', '.join(sorted(keys))}); "
                            "a newer torch may have written it")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(f"{field}", sorted(value)[:4], f"an object with {missing[0]}")
        return value

    def union(self, value, field: str, kinds: frozenset[str]) -> tuple[str, object]:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.fail(field, value, "an object with one field")
        (kind, inner), = value.items()
        if kind not in kinds:
            raise self.fail(f"{field} kind", kind, f"one of {', '.join(sorted(kinds))}")
        return kind, inner

    def list_(self, value, field: str) -> list:
        if not isinstance(value, list):
            raise self.fail(field, value, "a list")
        return value

    def dict_(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, value, "an object")
        return value

    def integer(self, value, field: str, low: int = -(1 << 63), high: int = (1 << 63) - 1) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(field, value, f"an integer in [{low}, {high}]")
        return value

    def boolean(self, value, field: str) -> bool:
        if type(value) is not bool:
            raise self.fail(field, value, "true or false")
        return value

    def number(self, value, field: str) -> None:
        if type(value) not in (int, float) and value not in ("Infinity", "-Infinity", "NaN"):
            raise self.fail(field, value, "a number")
        if type(value) is int:
            self.integer(value, field)

    def string(self, value, field: str, limit: int = MAX_STRING) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise self.fail(field, value, f"a string of at most {limit} characters")
        return value

    def literal(self, value, field: str) -> str:
        """A string argument (``approximate='tanh'``, an einsum equation). fx writes these with
        repr(), but torch also writes a string input into guard source between bare quotes."""
        if not (isinstance(value, str) and _LITERAL.fullmatch(value)):
            raise self.fail(field, value, "printable text without quotes or backslashes "
                            "(at most 1000 characters)")
        return value

    def identifier(self, value, field: str) -> str:
        if not is_identifier(value):
            raise self.fail(field, value, f"a Python identifier (at most {MAX_PART} characters)")
        self.names.add(value)
        return value

    def fqn(self, value, field: str, *, allow_empty: bool = False, call_index: bool = False):
        text = value
        if call_index and isinstance(value, str):  # "layer@1": the second call of a module
            text = re.sub(r"@[0-9]{1,9}$", "", value)
        if not is_fqn(text, allow_empty=allow_empty):
            raise self.fail(field, value, "a dotted path of Python identifiers and indices")
        self.mention(text)
        return value

    def class_name(self, value, field: str) -> str:
        # a class defined in a function: its qualname holds "<locals>"
        if not (isinstance(value, str) and is_class_name(value.replace(".<locals>.", "."))):
            raise self.fail(field, value, "a dotted class name")
        self.mention(value)
        return value

    def mention(self, name: str) -> None:
        """Record a dotted name and its prefixes: names the file could make torch import."""
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            self.names.add(".".join(parts[:i]))

    def target(self, value, field: str) -> str:
        self.string(value, field, 400)
        op = _OP.fullmatch(value)
        if not ((op and op["ns"] in OP_NAMESPACES) or _HIGHER_ORDER.fullmatch(value)
                or value in SYMBOLIC_OPS):
            raise self.fail(field, value, "an operator torch.export writes (torch.ops."
                            f"{'|'.join(OP_NAMESPACES)}.*, torch.ops.higher_order.*, "
                            "symbolic-size operators)")
        self.mention(value)
        return value

    # the program

    def program(self, member: str, data) -> None:
        self.member = member
        self.obj(data, "program", frozenset({
            "graph_module", "opset_version", "range_constraints", "schema_version", "verifiers",
            "torch_version", "guards_code"}), frozenset({"graph_module"}))
        for ns, version in self.dict_(data.get("opset_version", {}), "opset_version").items():
            self.identifier(ns, "opset_version namespace")
            self.integer(version, f"opset_version[{ns}]")
        for symbol, bounds in self.dict_(data.get("range_constraints", {}),
                                         "range_constraints").items():
            where = f"range_constraints[{shown(symbol)}]"
            self.expression(symbol, where)
            self.obj(bounds, where, frozenset({"min_val", "max_val"}))
            low, high = bounds.get("min_val"), bounds.get("max_val")
            for value in (low, high):
                if value is not None:
                    self.integer(value, where)
            if is_identifier(symbol):
                self.ranges[symbol] = (low, high)
        if "schema_version" in data:
            version = self.obj(data["schema_version"], "schema_version",
                               frozenset({"major", "minor"}))
            for key, value in version.items():
                self.integer(value, f"schema_version.{key}", 0, 1 << 20)
        for i, name in enumerate(self.list_(data.get("verifiers", []), "verifiers")):
            self.identifier(name, f"verifiers[{i}]")
        self.string(data.get("torch_version", ""), "torch_version", 200)
        guards = self.list_(data.get("guards_code", []), "guards_code")
        for i, line in enumerate(guards):
            problem = guard_problem(line)
            if problem:  # never run for an untrusted file, and it must still look like a guard
                raise self.fail(f"guards_code[{i}]", line, f"a guard on input sizes ({problem})")
        self.guards += len(guards)
        self.graph_module(data["graph_module"])

    def graph_module(self, gm) -> None:
        self.obj(gm, "graph_module", frozenset({
            "graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"}),
            frozenset({"graph", "signature"}))
        self.graph(gm["graph"], "graph", 0)
        self.signature(gm["signature"])
        for i, entry in enumerate(self.list_(gm.get("module_call_graph", []),
                                             "module_call_graph")):
            where = f"module_call_graph[{i}]"
            self.obj(entry, where, frozenset({"fqn", "signature"}), frozenset({"fqn"}))
            self.fqn(entry["fqn"], f"{where}.fqn", allow_empty=True, call_index=True)
            if entry.get("signature") is not None:
                self.call_signature(entry["signature"], f"{where}.signature")
        for key, value in self.dict_(gm.get("metadata", {}), "graph_module.metadata").items():
            self.string(key, "graph_module.metadata key", 200)
            self.string(value, f"graph_module.metadata[{shown(key)}]")
        for name, fields in self.dict_(gm.get("treespec_namedtuple_fields", {}),
                                       "treespec_namedtuple_fields").items():
            where = f"treespec_namedtuple_fields[{shown(name)}]"
            self.class_name(name, where)
            self.obj(fields, where, frozenset({"field_names"}), frozenset({"field_names"}))
            for j, f in enumerate(self.list_(fields["field_names"], where)):
                self.identifier(f, f"{where}.field_names[{j}]")

    def call_signature(self, sig, where: str) -> None:
        self.obj(sig, where, frozenset({"inputs", "outputs", "in_spec", "out_spec",
                                        "forward_arg_names"}))
        for key in ("inputs", "outputs"):
            for j, arg in enumerate(self.list_(sig.get(key, []), f"{where}.{key}")):
                self.argument(arg, f"{where}.{key}[{j}]", 0)
        for key in ("in_spec", "out_spec"):
            if key in sig:
                self.treespec(self.string(sig[key], f"{where}.{key}"), f"{where}.{key}")
        for j, name in enumerate(self.list_(sig.get("forward_arg_names") or [],
                                            f"{where}.forward_arg_names")):
            self.identifier(name, f"{where}.forward_arg_names[{j}]")

    def treespec(self, text: str, where: str) -> None:
        """A pytree spec, stored as JSON text: type names are classes, contexts hold names."""
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(where, text, "a pytree spec (JSON)") from exc
        if not (isinstance(spec, list) and len(spec) == 2 and type(spec[0]) is int):
            raise self.fail(where, text, "a pytree spec [version, tree]")
        todo = [(spec[1], 0)]
        count = 0
        while todo:
            node, depth = todo.pop()
            count += 1
            if depth > MAX_DEPTH or count > 1_000_000:
                raise self.fail(where, text, f"a pytree spec at most {MAX_DEPTH} deep")
            self.obj(node, where, frozenset({"type", "context", "children_spec"}))
            if node.get("type") is not None:
                self.class_name(node["type"], f"{where} type")
            if node.get("context") is not None:
                self.context(self.string(node["context"], f"{where} context"), where)
            todo += [(child, depth + 1) for child in self.list_(node.get("children_spec", []),
                                                                 where)]

    def context(self, text: str, where: str) -> None:
        """A pytree node's context: dict keys (written into the generated forward's source),
        a namedtuple's class, or an enum as module:qualname and member name."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"{where} context", text, "JSON") from exc
        todo = [(value, 0)]
        while todo:
            item, depth = todo.pop()
            if depth > MAX_DEPTH:
                raise self.fail(f"{where} context", text, f"at most {MAX_DEPTH} deep")
            if isinstance(item, dict) and "__enum__" in item:
                self.obj(item, f"{where} enum", frozenset({"__enum__", "fqn", "name"}))
                module, sep, qualname = str(item.get("fqn", "")).partition(":")
                if not sep:
                    raise self.fail(f"{where} enum fqn", item.get("fqn"), "module:qualname")
                self.class_name(module, f"{where} enum module")
                self.class_name(qualname, f"{where} enum class")
                self.identifier(item.get("name"), f"{where} enum member")
            elif isinstance(item, dict):
                for k, v in item.items():
                    self.class_name(k, f"{where} context key")
                    todo.append((v, depth + 1))
            elif isinstance(item, list):
                todo += [(v, depth + 1) for v in item]
            elif isinstance(item, str):
                self.class_name(item, f"{where} context key")
            elif item is not None and type(item) not in (int, float, bool):
                raise self.fail(f"{where} context", item, "names and numbers")

    def signature(self, sig) -> None:
        self.obj(sig, "signature", frozenset({"input_specs", "output_specs"}))
        inputs = {
            "user_input": ("arg", None), "parameter": ("arg", "parameter_name"),
            "buffer": ("arg", "buffer_name"), "tensor_constant": ("arg", "tensor_constant_name"),
            "token": ("arg", None), "constant_input": (None, "name"),
        }
        for i, spec in enumerate(self.list_(sig.get("input_specs", []), "input_specs")):
            where = f"input_specs[{i}]"
            kind, inner = self.union(spec, where, frozenset(inputs))
            self.dict_(inner, f"{where}.{kind}")
            arg_key, name_key = inputs[kind]
            if arg_key:
                self.any_argument(inner.get(arg_key), f"{where}.{kind}.arg")
            if name_key:
                self.fqn(inner.get(name_key), f"{where}.{kind}.{name_key}")
            if kind == "constant_input":
                self.union(inner.get("value"), f"{where}.value",
                           frozenset({"as_none", "as_int", "as_float", "as_bool"}))
            if kind == "buffer" and "persistent" in inner:
                self.boolean(inner["persistent"], f"{where}.buffer.persistent")
        outputs = {
            "user_output": None, "loss_output": None, "buffer_mutation": "buffer_name",
            "gradient_to_parameter": "parameter_name",
            "gradient_to_user_input": "user_input_name",
            "user_input_mutation": "user_input_name", "token": None,
            "parameter_mutation": "parameter_name",
        }
        for i, spec in enumerate(self.list_(sig.get("output_specs", []), "output_specs")):
            where = f"output_specs[{i}]"
            kind, inner = self.union(spec, where, frozenset(outputs))
            self.dict_(inner, f"{where}.{kind}")
            self.any_argument(inner.get("arg"), f"{where}.{kind}.arg")
            if outputs[kind]:
                self.fqn(inner.get(outputs[kind]), f"{where}.{kind}.{outputs[kind]}")

    def any_argument(self, arg, where: str) -> None:
        """An Argument, or a bare TensorArgument/TokenArgument ({"name": ...})."""
        if isinstance(arg, dict) and set(arg) == {"name"}:
            self.identifier(arg["name"], f"{where}.name")
        else:
            self.argument(arg, where, 0)

    # graphs, nodes, arguments

    def graph(self, graph, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, "...", f"a graph nested at most {MAX_DEPTH} deep")
        self.obj(graph, where, frozenset({
            "inputs", "outputs", "nodes", "tensor_values", "sym_int_values", "sym_bool_values",
            "is_single_tensor_return", "custom_obj_values", "sym_float_values"}),
            frozenset({"inputs", "outputs", "nodes"}))
        for key in ("inputs", "outputs"):
            for i, arg in enumerate(self.list_(graph[key], f"{where}.{key}")):
                self.argument(arg, f"{where}.{key}[{i}]", depth)
        for i, node in enumerate(self.list_(graph["nodes"], f"{where}.nodes")):
            self.node(node, f"{where}.nodes[{i}]", depth)
        for name, meta in self.dict_(graph.get("tensor_values", {}),
                                     f"{where}.tensor_values").items():
            self.identifier(name, f"{where}.tensor_values name")
            self.tensor_meta(meta, f"{where}.tensor_values[{name}]")
        for key, kinds in (("sym_int_values", "as_int"), ("sym_bool_values", "as_bool"),
                           ("sym_float_values", "as_float")):
            for name, value in self.dict_(graph.get(key, {}), f"{where}.{key}").items():
                self.identifier(name, f"{where}.{key} name")
                self.sym_value(value, f"{where}.{key}[{name}]", kinds)
        if graph.get("custom_obj_values"):
            name = next(iter(graph["custom_obj_values"]))
            raise self.fail(f"{where}.custom_obj_values", name,
                            "empty (a TorchBind object loads by unpickling)")

    def node(self, node, where: str, depth: int) -> None:
        self.obj(node, where, frozenset({"target", "inputs", "outputs", "metadata",
                                         "is_hop_single_tensor_return", "name"}),
                 frozenset({"target", "inputs", "outputs"}))
        self.target(node["target"], f"{where}.target")
        if node.get("name") is not None:
            self.identifier(node["name"], f"{where}.name")
        for i, named in enumerate(self.list_(node["inputs"], f"{where}.inputs")):
            at = f"{where}.inputs[{i}]"
            self.obj(named, at, frozenset({"name", "arg", "kind"}), frozenset({"name", "arg"}))
            self.identifier(named["name"], f"{at}.name")
            self.argument(named["arg"], f"{at}.arg", depth)
            if named.get("kind") is not None:
                self.integer(named["kind"], f"{at}.kind", 0, 16)
        for i, arg in enumerate(self.list_(node["outputs"], f"{where}.outputs")):
            self.argument(arg, f"{where}.outputs[{i}]", depth)
        for key, value in self.dict_(node.get("metadata", {}), f"{where}.metadata").items():
            self.metadata(key, value, f"{where}.metadata")

    def metadata(self, key, value, where: str) -> None:
        self.string(key, f"{where} key", 200)
        text = self.string(value, f"{where}[{key}]")
        if key == "stack_trace":
            # only ever a comment in generated code, where a carriage return would end it
            if "\r" in text or "\x00" in text:
                raise self.fail(f"{where}.stack_trace", text, "text without carriage returns")
        elif key == "nn_module_stack":
            self.module_stack(text, f"{where}.nn_module_stack")
        elif key == "source_fn_stack":
            for item in text.split(";"):
                name, sep, fn = item.partition(",")
                if not sep:
                    raise self.fail(f"{where}.source_fn_stack", item, "name,function")
                self.identifier(name, f"{where}.source_fn_stack name")
                self.class_name(fn, f"{where}.source_fn_stack function")
        elif key in ("custom", "from_node"):
            try:
                _bounded_json(text)
            except (ValueError, RecursionError) as exc:
                raise self.fail(f"{where}.{key}", text, f"JSON at most {MAX_DEPTH} deep") from exc

    def module_stack(self, text: str, where: str) -> None:
        """``key,path,class;...``: paths become submodule names, classes are names too."""
        for item in text.split(";"):
            parts = _split_stack_item(item)
            if parts is None:
                raise self.fail(where, item, "key,path,class")
            key, path, cls = parts
            if any(c in key for c in "\\\n\r\"") or len(key) > 2000:
                raise self.fail(f"{where} key", key, "a module key without quotes or escapes")
            self.fqn(path, f"{where} path", allow_empty=True, call_index=True)
            if not (cls == path == key or cls == ""):  # torch's placeholder for "no module"
                self.class_name(cls, f"{where} class")

    def argument(self, arg, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, "...", f"arguments nested at most {MAX_DEPTH} deep")
        kind, value = self.union(arg, where, _ARGUMENT_KINDS)
        where = f"{where}.{kind}"
        if kind in ("as_none", "as_bool"):
            if kind == "as_bool":
                self.boolean(value, where)
        elif kind in ("as_int", "as_scalar_type", "as_memory_format", "as_layout"):
            self.integer(value, where)
        elif kind == "as_float":
            self.number(value, where)
        elif kind in ("as_ints", "as_floats", "as_bools", "as_int_lists", "as_float_lists"):
            for item in self.list_(value, where):
                for x in (self.list_(item, where) if kind.endswith("_lists") else [item]):
                    if kind == "as_bools":
                        self.boolean(x, where)
                    else:
                        self.number(x, where)
        elif kind in ("as_string", "as_strings"):
            for item in (self.list_(value, where) if kind == "as_strings" else [value]):
                self.literal(item, where)
        elif kind in ("as_tensor", "as_graph"):
            self.obj(value, where, frozenset({"name", "graph"} if kind == "as_graph"
                                             else {"name"}), frozenset({"name"}))
            self.identifier(value["name"], f"{where}.name")
            if kind == "as_graph":
                self.graph(value.get("graph"), f"{where}.graph", depth + 1)
        elif kind in ("as_tensors", "as_nested_tensors"):
            for item in self.list_(value, where):
                for t in (self.list_(item, where) if kind == "as_nested_tensors" else [item]):
                    self.obj(t, where, frozenset({"name"}), frozenset({"name"}))
                    self.identifier(t["name"], f"{where}.name")
        elif kind in ("as_optional_tensor", "as_optional_tensors"):
            for item in (self.list_(value, where) if kind.endswith("s") else [value]):
                inner_kind, inner = self.union(item, where, frozenset({"as_tensor", "as_none"}))
                if inner_kind == "as_tensor":
                    self.obj(inner, where, frozenset({"name"}), frozenset({"name"}))
                    self.identifier(inner["name"], f"{where}.name")
        elif kind in ("as_sym_int", "as_sym_bool", "as_sym_float", "as_sym_ints",
                      "as_sym_bools", "as_sym_floats"):
            concrete = {"int": "as_int", "boo": "as_bool", "flo": "as_float"}[kind[7:10]]
            for item in (self.list_(value, where) if kind.endswith("s") else [value]):
                inner_kind, inner = self.union(item, where, frozenset({"as_name", concrete}))
                if inner_kind == "as_name":
                    self.identifier(inner, f"{where}.as_name")
                elif concrete == "as_bool":
                    self.boolean(inner, where)
                else:
                    self.number(inner, where)
        elif kind == "as_device":
            self.device(value, where)
        elif kind == "as_complex":
            self.obj(value, where, frozenset({"real", "imag"}))
            for x in value.values():
                self.number(x, where)
        elif kind == "as_operator":
            self.target(value, where)
        elif kind == "as_string_to_argument":
            for key, inner in self.dict_(value, where).items():
                self.string(key, f"{where} key", 1000)
                self.argument(inner, f"{where}[{shown(key)}]", depth + 1)
        elif kind == "as_custom_obj":
            raise self.fail(where, value, "a tensor or a plain value (a TorchBind object loads "
                            "by unpickling)")

    def device(self, value, where: str) -> None:
        self.obj(value, where, frozenset({"type", "index"}), frozenset({"type"}))
        if not (isinstance(value["type"], str) and re.fullmatch(r"[a-z_]{1,20}", value["type"])):
            raise self.fail(f"{where}.type", value["type"], "a device type such as cpu or cuda")
        self.names.add(value["type"])
        if value.get("index") is not None:
            self.integer(value["index"], f"{where}.index", 0, 1 << 16)

    # tensors and shapes

    def tensor_meta(self, meta, where: str) -> tuple[list, list, object]:
        self.obj(meta, where, frozenset({"dtype", "sizes", "requires_grad", "device", "strides",
                                         "storage_offset", "layout"}),
                 frozenset({"dtype", "sizes", "strides", "storage_offset"}))
        if meta["dtype"] not in ELEMENT_SIZE and meta["dtype"] != 0:
            raise self.fail(f"{where}.dtype", meta["dtype"], "a dtype torch.export writes")
        if meta.get("layout", STRIDED) not in LAYOUTS:
            raise self.fail(f"{where}.layout", meta.get("layout"), "a layout torch.export writes")
        if "requires_grad" in meta:
            self.boolean(meta["requires_grad"], f"{where}.requires_grad")
        if "device" in meta:
            self.device(meta["device"], f"{where}.device")
        sizes = [self.sym_int(s, f"{where}.sizes") for s in self.list_(meta["sizes"], where)]
        strides = [self.sym_int(s, f"{where}.strides") for s in self.list_(meta["strides"], where)]
        offset = self.sym_int(meta["storage_offset"], f"{where}.storage_offset")
        if len(sizes) != len(strides) or len(sizes) > 64:
            raise self.fail(f"{where}.strides", len(strides), f"{len(sizes)} strides (one a dim)")
        numel = 1
        for size in sizes:
            numel *= size if isinstance(size, int) else 1
            if numel > MAX_ELEMENTS:
                raise self.fail(f"{where}.sizes", [s for s in sizes],
                                f"at most {MAX_ELEMENTS} elements")
        return sizes, strides, offset

    def sym_int(self, value, where: str) -> int | None:
        """A size, stride or offset: its integer, or None for a symbolic one (its hint checked)."""
        kind, inner = self.union(value, where, frozenset({"as_int", "as_expr"}))
        if kind == "as_int":
            return self.integer(inner, where, 0, MAX_DIM)
        self.sym_expr(inner, where)
        return None

    def sym_value(self, value, where: str, concrete: str) -> None:
        kind, inner = self.union(value, where, frozenset({concrete, "as_expr"}))
        if kind == "as_expr":
            self.sym_expr(inner, where)

    def sym_expr(self, value, where: str) -> None:
        self.obj(value, where, frozenset({"expr_str", "hint"}), frozenset({"expr_str"}))
        self.expression(value["expr_str"], f"{where}.expr_str")
        if value.get("hint") is not None:
            kind, hint = self.union(value["hint"], f"{where}.hint",
                                    frozenset({"as_int", "as_bool", "as_float"}))
            if kind == "as_bool":
                self.boolean(hint, where)
            else:
                self.number(hint, where)

    def expression(self, text, where: str) -> None:
        problem = expression_problem(text)
        if problem:
            raise self.fail(where, text, f"a shape expression of bounded arithmetic ({problem})")

    # payloads: the tensors stored in the archive

    def payload_config(self, member: str, data, sizes: dict[str, int]) -> None:
        self.member = member
        folder = member.rsplit("/", 1)[0]
        constants = member.casefold().endswith("_constants_config.json")
        self.obj(data, "payload config", frozenset({"config"}), frozenset({"config"}))
        prefix = "tensor_" if constants else "weight_"
        for fqn, meta in self.dict_(data["config"], "config").items():
            where = f"config[{shown(fqn)}]"
            self.fqn(fqn, f"{'constant' if constants else 'weight'} name")
            self.obj(meta, where, frozenset({"path_name", "is_param", "use_pickle",
                                             "tensor_meta"}), frozenset({"path_name"}))
            name = meta["path_name"]
            if not (isinstance(name, str) and re.fullmatch(re.escape(prefix) + r"[0-9]{1,9}",
                                                           name)):
                raise self.fail(f"{where}.path_name", name,
                                f"{prefix}N (other payloads load by unpickling)")
            if meta.get("use_pickle"):
                raise self.fail(f"{where}.use_pickle", True, "false: unpickling the payload "
                                "would run code from the file")
            if "is_param" in meta:
                self.boolean(meta["is_param"], f"{where}.is_param")
            if meta.get("tensor_meta") is None:
                raise self.fail(f"{where}.tensor_meta", None, "the tensor's sizes and strides")
            stored = sizes.get(f"{folder}/{name}".casefold())
            if stored is None:
                raise self.fail(f"{where}.path_name", name, "a record the archive holds")
            self.stored_tensor(meta["tensor_meta"], f"{where}.tensor_meta", stored)

    def stored_tensor(self, meta, where: str, stored: int) -> None:
        sizes, strides, offset = self.tensor_meta(meta, where)
        if None in sizes or None in strides or offset is None:
            raise self.fail(where, "a symbolic size", "concrete sizes (a stored tensor has them)")
        if meta.get("layout", STRIDED) != STRIDED:
            raise self.fail(f"{where}.layout", meta.get("layout"), f"{STRIDED} (strided)")
        element = ELEMENT_SIZE.get(meta["dtype"], 1)
        numel = 1
        for size in sizes:
            numel *= size
        if stored:  # torch views the record's elements with these sizes and strides
            extent = 0 if numel == 0 else offset + 1 + sum(
                (size - 1) * stride for size, stride in zip(sizes, strides))
            if extent * element > stored:
                raise self.fail(f"{where} extent", f"{extent} elements",
                                f"within the {stored} bytes its record holds")
        self.made_up += made_up_bytes(numel * element, stored)
        if self.made_up > EXPANSION_CAP:
            raise self.fail(where, f"{numel} elements from {stored} bytes",
                            f"a tensor within {EXPANSION_FACTOR}x its stored bytes (stride 0 "
                            f"or zeros: at most {EXPANSION_CAP >> 20} MiB in all)")


def made_up_bytes(materialised: int, stored: int) -> int:
    """Bytes a tensor would count against ``EXPANSION_CAP``: all of them when it materialises
    to more than ``EXPANSION_FACTOR`` times what is stored for it, else none."""
    return materialised if materialised > EXPANSION_FACTOR * stored else 0


def check_tensor_sizes(named_tensors, where: str | Path) -> None:
    """Refuse loaded tensors that view far more elements than their storage holds.

    For tensors rebuilt by an unpickler (a torch.nn pickle, a legacy ``.pt2``'s
    state dict): a view costs nothing until something copies it, and a few
    bytes with stride 0 can claim gigabytes. Same rule as for ``.pt2`` payloads.
    """
    made_up = 0
    for name, t in named_tensors:
        try:
            stored = t.untyped_storage().nbytes()
        except (AttributeError, TypeError, RuntimeError, NotImplementedError):
            continue  # not a tensor, or no storage (meta tensors, subclasses)
        made_up += made_up_bytes(t.numel() * t.element_size(), stored)
        if made_up > EXPANSION_CAP or t.numel() > MAX_ELEMENTS:
            raise UnsafeFileError(
                f"{where}: refused: tensor {shown(name)} has {t.numel()} elements from "
                f"{stored} stored bytes, not a tensor within {EXPANSION_FACTOR}x its stored "
                f"bytes (stride 0: at most {EXPANSION_CAP >> 20} MiB in all); save the real "
                "tensor instead of an expanded view")


_ARGUMENT_KINDS = frozenset({
    "as_none", "as_tensor", "as_tensors", "as_int", "as_ints", "as_float", "as_floats",
    "as_string", "as_strings", "as_sym_int", "as_sym_ints", "as_scalar_type",
    "as_memory_format", "as_layout", "as_device", "as_bool", "as_bools", "as_sym_bool",
    "as_sym_bools", "as_graph", "as_optional_tensors", "as_custom_obj", "as_operator",
    "as_sym_float", "as_sym_floats", "as_optional_tensor", "as_complex", "as_nested_tensors",
    "as_int_lists", "as_string_to_argument", "as_float_lists",
})


def _split_stack_item(item: str) -> list[str] | None:
    """torch's split of ``key,path,class`` (commas inside brackets belong to the key)."""
    out, start, depth = [], 0, 0
    for i, c in enumerate(item):
        if c in "[(":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(item[start:i])
            start = i + 1
    out.append(item[start:])
    return out if len(out) == 3 else None


def _bounded_json(text: str) -> None:
    value = json.loads(text)
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ValueError("too deep")
        if isinstance(item, dict):
            todo += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            todo += [(v, depth + 1) for v in item]


# -- guards --------------------------------------------------------------------------------

def guard_problem(text: object) -> str | None:
    """Why ``text`` is not a guard as torch writes them (``L['x'].size()[0] <= 64``), or None.

    Guards are never run for an untrusted file (``drop_guards_code``); this
    check only refuses an archive whose guards are something else, and lets
    the checks on capture bounds read them as data. An input reference
    ``L['name']`` followed by ``.size()[i]``, ``.stride()[i]`` or
    ``.storage_offset()`` stands for a size symbol; the rest is shape arithmetic.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return f"a string of at most {MAX_EXPR_CHARS} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"
    try:
        tree = _InputRefs().visit(tree)
    except _NotArithmetic as exc:
        return str(exc)
    return expression_problem(ast.unparse(tree))


class _InputRefs(ast.NodeTransformer):
    """``L['x'].size()[0]`` (and stride, storage_offset, numel, dim) -> a symbol name."""

    _METHODS = frozenset({"size", "stride", "storage_offset", "numel", "dim"})

    def visit_Subscript(self, node):
        base = node
        while isinstance(base, (ast.Subscript, ast.Call, ast.Attribute)):
            if isinstance(base, ast.Subscript):
                if not (isinstance(base.slice, ast.Constant)
                        and type(base.slice.value) in (int, str)
                        and (type(base.slice.value) is int or is_identifier(base.slice.value))):
                    raise _NotArithmetic("an index that is not a name or a number")
                base = base.value
            elif isinstance(base, ast.Call):
                if base.args or base.keywords or not (
                        isinstance(base.func, ast.Attribute) and base.func.attr in self._METHODS):
                    raise _NotArithmetic("a call other than size(), stride() or numel()")
                base = base.func.value
            else:
                raise _NotArithmetic(f"attribute {base.attr}")
        if not (isinstance(base, ast.Name) and base.id == "L"):
            raise _NotArithmetic("a subscript of something other than an input")
        return ast.copy_location(ast.Name(id="s_input", ctx=ast.Load()), node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute):  # L['x'].numel() without a subscript after it
            return self.visit_Subscript(node)
        return self.generic_visit(node)

    def visit_Attribute(self, node):
        raise _NotArithmetic(f"attribute {node.attr}")


# -- symbolic shape expressions --------------------------------------------------------------

# The functions torch's deserializer gives sympy (torch.utils._sympy.functions) and the
# sympy classes its srepr() writes. All of them build math objects from their arguments.
EXPRESSION_FUNCTIONS = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Add", "Mul",
    "Pow", "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "Equality", "Unequality", "GreaterThan",
    "StrictGreaterThan", "LessThan", "StrictLessThan", "And", "Or", "Not", "Piecewise",
    "ExprCondPair", "Tuple", "Symbol", "Integer", "Float", "Rational", "ceiling", "floor",
    "sqrt", "IntInfinity", "NegativeIntInfinity", "Infinity", "NegativeInfinity", "NaN",
    "Zero", "One", "NegativeOne", "Half", "BooleanTrue", "BooleanFalse", "ComplexInfinity",
    "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
})
EXPRESSION_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "true", "false", "True",
                                  "False", "S"})
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_PRODUCTS = frozenset({"Mul"})
_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real",
                          "zero", "nonzero", "finite", "infinite", "even", "odd", "rational",
                          "commutative", "precision"})
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call,
               ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.keyword, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop)
_FLOAT_TEXT = re.compile(
    r"[-+]?(?:[0-9]{1,400}(?:\.[0-9]{0,400})?(?:[eE][-+]?[0-9]{1,6})?|inf|nan)")


def parse_expression(text: str) -> ast.Expression:
    """A symbolic shape expression as a checked Python ``ast`` (never evaluated).

    Raises:
        ValueError: why ``text`` is not bounded shape arithmetic.
    """
    problem = expression_problem(text)
    if problem:
        raise ValueError(problem)
    return ast.parse(text, mode="eval")


def expression_problem(text: object) -> str | None:
    """Why ``text`` is not bounded shape arithmetic, or None when it is.

    Accepted: integers, symbols, ``+ - * / // % **``, comparisons and the
    functions torch's shape algebra uses, in ``str()`` or ``srepr()`` spelling.
    Bounded: the text's length, its node count, each exponent (a constant of
    at most ``MAX_EXPONENT``) and the bits of the largest number it can make,
    estimated bottom-up, so sympy's arithmetic on it ends quickly.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return f"a string of at most {MAX_EXPR_CHARS} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_EXPR_NODES:
        return f"more than {MAX_EXPR_NODES} terms"
    for node in nodes:
        if not isinstance(node, _EXPR_NODES):
            return f"{type(node).__name__} is not arithmetic"
    try:
        bits = _bits(tree.body, 0)
    except _NotArithmetic as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    if bits > MAX_EXPR_BITS:
        return f"numbers of up to {bits} bits, more than {MAX_EXPR_BITS}"
    return None


class _NotArithmetic(Exception):
    pass


_SYMBOL_BITS = 64  # a size symbol's value is below 2**63


def _bits(node: ast.AST, depth: int) -> int:
    """An upper bound on the bits of the number ``node`` can make; raises on anything else."""
    if depth > 200:
        raise _NotArithmetic("nested too deeply")
    if isinstance(node, ast.Constant):
        value = node.value
        if type(value) is bool:
            return 1
        if type(value) is int:
            if value.bit_length() > 128:
                raise _NotArithmetic(f"an integer of {value.bit_length()} bits")
            return max(value.bit_length(), 1)
        if type(value) is float:
            return 64
        raise _NotArithmetic(f"constant {shown(value)}")
    if isinstance(node, ast.Name):
        if node.id in EXPRESSION_FUNCTIONS or node.id in EXPRESSION_CONSTANTS or (
                is_identifier(node.id) and not node.id.startswith("_")
                and not hasattr(builtins, node.id)):  # a fresh symbol: resolves to nothing
            return _SYMBOL_BITS
        raise _NotArithmetic(f"name {shown(node.id)}")
    if isinstance(node, ast.UnaryOp):
        return _bits(node.operand, depth + 1)
    if isinstance(node, (ast.BoolOp, ast.Compare, ast.Tuple)):
        parts = (node.values if isinstance(node, ast.BoolOp) else
                 [node.left, *node.comparators] if isinstance(node, ast.Compare) else node.elts)
        return max((_bits(p, depth + 1) for p in parts), default=1)
    if isinstance(node, ast.BinOp):
        left = _bits(node.left, depth + 1)
        if isinstance(node.op, ast.Pow):
            return left * _exponent(node.right)
        if isinstance(node.op, (ast.LShift,)):
            return left + _exponent(node.right)
        right = _bits(node.right, depth + 1)
        if isinstance(node.op, ast.Mult):
            return left + right
        return max(left, right) + 1
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in EXPRESSION_FUNCTIONS:
            raise _NotArithmetic(f"a call of {shown(ast.unparse(node.func))}")
        name = node.func.id
        if name in ("Symbol", "Float", "Integer", "Rational"):
            return _literal(node)
        if node.keywords:
            raise _NotArithmetic(f"keyword {node.keywords[0].arg} of {name}")
        if name in _POWERS:
            if len(node.args) != 2:
                raise _NotArithmetic(f"{name} of {len(node.args)} arguments")
            return _bits(node.args[0], depth + 1) * _exponent(node.args[1])
        if name == "LShift" and len(node.args) == 2:
            return _bits(node.args[0], depth + 1) + _exponent(node.args[1])
        parts = [_bits(a, depth + 1) for a in node.args]
        if name in _PRODUCTS:
            return sum(parts) or 1
        return max(parts, default=1) + 1
    raise _NotArithmetic(f"{type(node).__name__} is not arithmetic")


def _exponent(node: ast.AST) -> int:
    """A power's exponent: an integer constant of at most MAX_EXPONENT, or a simple fraction."""
    value = None
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int:
        value = -node.operand.value
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        args = node.args
        ints = [a.value if isinstance(a, ast.Constant) and type(a.value) is int else
                -a.operand.value if isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub)
                and isinstance(a.operand, ast.Constant) and type(a.operand.value) is int
                else None for a in args]
        if node.func.id == "Integer" and len(ints) == 1 and ints[0] is not None:
            value = ints[0]
        elif node.func.id == "Rational" and len(ints) == 2 and None not in ints and ints[1]:
            value = max(1, -(-abs(ints[0]) // abs(ints[1])))
        elif node.func.id in ("Half", "NegativeOne", "One", "Zero") and not args:
            value = 1
    elif isinstance(node, ast.Name) and node.id in ("Half", "S"):
        value = 1
    if value is None or abs(value) > MAX_EXPONENT:
        raise _NotArithmetic(f"an exponent that is not an integer of at most {MAX_EXPONENT}")
    return max(abs(value), 1)


def _literal(node: ast.Call) -> int:
    """Symbol('s0', positive=True), Integer(3), Float('1.5', precision=53), Rational(1, 2)."""
    name, args = node.func.id, node.args
    for kw in node.keywords:
        if name not in ("Symbol", "Float") or kw.arg not in _ASSUMPTIONS or not (
                isinstance(kw.value, ast.Constant) and type(kw.value.value) in (bool, int)):
            raise _NotArithmetic(f"keyword {kw.arg} of {name}")
    if name == "Symbol":
        if len(args) == 1 and isinstance(args[0], ast.Constant) and is_identifier(args[0].value):
            return _SYMBOL_BITS
        raise _NotArithmetic("a Symbol whose name is not an identifier")
    if name == "Float":
        if len(args) == 1 and isinstance(args[0], ast.Constant) and (
                type(args[0].value) in (int, float) or isinstance(args[0].value, str)
                and _FLOAT_TEXT.fullmatch(args[0].value)):
            return 64
        raise _NotArithmetic("a Float that is not a number")
    if len(args) not in (1, 2) or not all(
            isinstance(a, ast.Constant) and type(a.value) is int or isinstance(a, ast.UnaryOp)
            and isinstance(a.operand, ast.Constant) and type(a.operand.value) is int
            for a in args):
        raise _NotArithmetic(f"{name} of something other than integers")
    return max(_bits(a, 0) for a in args)


__all__ = ["check_archive", "capture_ranges", "drop_guards_code", "check_tensor_sizes",
           "parse_expression", "expression_problem", "guard_problem", "ArchiveFacts"]
