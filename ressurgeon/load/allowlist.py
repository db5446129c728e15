"""The allowlist of the .pt2 validator: the limits, and what a name, an operator or a JSON value may be.

See ``validate.py`` for what is checked and why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .._names import MAX_PART, is_class_name, is_fqn, is_identifier, shown
from ..errors import UnsafeFileError



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


# -- the allowlist ---------------------------------------------------------------------------

class _JsonChecker:
    """The shapes a JSON value may have: types, bounds, identifiers, dotted paths, operators."""

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


