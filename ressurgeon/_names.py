"""Is this string from a file safe to become a name in generated code? One rule, one place.

torch.fx writes node names, placeholder targets and attribute paths into the
Python source it generates and ``exec``s (``def forward(self, x):``,
``getattr(self, "a.b")``), unescaped; ``--save-code`` writes module names into
``module.py``. A name read from a file is therefore accepted only when it is a
plain Python identifier (or, for a dotted path, identifiers and decimal
indices such as ``layers.0.conv``) of bounded length: such a string cannot
close a quote, open a call, or spell anything but a name. This is an
allowlist of shapes, never a list of bad strings.

Every check raises ``UnsafeFileError`` with one line naming the field and the
offending value (cut to about 60 characters, control characters escaped).
"""

from __future__ import annotations

import re

from .errors import UnsafeFileError

MAX_PART = 200            # characters in one identifier or one part of a dotted path
MAX_PARTS = 64            # parts of a dotted path (nesting depth of modules)
SHOWN = 60                # characters of an offending value quoted in a message

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_DUNDER = re.compile(r"__\w*__")


def shown(value: object) -> str:
    """``value`` quoted for a one-line message: repr-escaped, cut to about ``SHOWN`` characters."""
    text = repr(value)[:SHOWN + 20]
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def is_identifier(value: object) -> bool:
    """An ASCII Python identifier of at most ``MAX_PART`` characters.

    Keywords pass: in a name position they are a SyntaxError at worst, never code.
    """
    return (isinstance(value, str) and 0 < len(value) <= MAX_PART
            and _IDENTIFIER.fullmatch(value) is not None)


def is_fqn(value: object, *, allow_empty: bool = False) -> bool:
    """A dotted path of identifiers and decimal indices (``layers.0.attn``), bounded in length.

    ``allow_empty``: the empty string names the root module (``nn_module_stack``
    and the module call graph use it).
    """
    if not isinstance(value, str):
        return False
    if value == "":
        return allow_empty
    parts = value.split(".")
    # a dunder part (``__class__.forward``) would walk from a module to its class
    # when torch assigns the attribute path
    return len(parts) <= MAX_PARTS and all(
        (is_identifier(p) and not _DUNDER.fullmatch(p))
        or (len(p) <= MAX_PART and _INDEX.fullmatch(p)) for p in parts)


def is_class_name(value: object) -> bool:
    """A dotted path of identifiers (``torch.nn.modules.conv.Conv2d``), bounded in length."""
    if not isinstance(value, str):
        return False
    parts = value.split(".")
    return len(parts) <= MAX_PARTS and all(is_identifier(p) for p in parts)


def check_identifier(field: str, value: object) -> str:
    """``value`` when it is a safe identifier; UnsafeFileError naming ``field`` otherwise."""
    if not is_identifier(value):
        raise refused(field, value, "a Python identifier")
    return value


def check_fqn(field: str, value: object, *, allow_empty: bool = False) -> str:
    """``value`` when it is a safe dotted path; UnsafeFileError naming ``field`` otherwise."""
    if not is_fqn(value, allow_empty=allow_empty):
        raise refused(field, value, "a dotted path of Python identifiers and indices")
    return value


def check_class_name(field: str, value: object) -> str:
    """``value`` when it is a dotted path of identifiers; UnsafeFileError otherwise."""
    if not is_class_name(value):
        raise refused(field, value, "a dotted class name")
    return value


def refused(field: str, value: object, wanted: str, *, where: object = "",
            fix: str = "") -> UnsafeFileError:
    """The one-line refusal of a value that is not ``wanted`` (``where``: the file)."""
    fix = fix or "a name that is not one could run code once torch writes it into Python source"
    head = f"{where}: " if where else ""
    return UnsafeFileError(f"{head}refused: {field} is {shown(value)}, not {wanted} (at most "
                           f"{MAX_PART} characters a part); {fix}")


__all__ = ["check_identifier", "check_fqn", "check_class_name", "is_identifier", "is_fqn",
           "is_class_name", "shown", "refused", "MAX_PART", "MAX_PARTS"]
