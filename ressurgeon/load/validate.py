"""Check a ``.pt2`` archive's serialized program against an allowlist before torch reads it.

Four files: this one (the entry points), ``allowlist.py`` (the limits and what a
name, an operator or a JSON value may be), ``program.py`` (the walk over the
program JSON) and ``expressions.py`` (guards and shape expressions, bounded).

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

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoadError, UnsafeFileError

log = logging.getLogger(__name__)
from .allowlist import FIX, MAX_JSON_BYTES
from .allowlist import check_tensor_sizes
from .expressions import expression_problem, guard_problem, parse_expression
from .program import _Checker

__all__ = ["check_archive", "capture_ranges", "drop_guards_code", "check_tensor_sizes",
           "parse_expression", "expression_problem", "guard_problem", "ArchiveFacts"]


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


def drop_guards_code(ep, path: str | Path) -> tuple[str, ...]:
    """Empty a loaded program's ``guards_code`` (Python source from the file) before
    ``ep.module()`` compiles it, and return its lines as data: ressurgeon checks them
    itself with a bounded parser (``capture/bounds.py``), never by compiling them.
    Torch still checks the inputs against the archive's ``range_constraints``."""
    guards = tuple(getattr(ep, "_guards_code", None) or ())
    if guards:
        log.debug("%s: not running the %d lines of guards code the archive carries "
                  "(Python source from the file); ressurgeon checks them as data",
                  path, len(guards))
        ep._guards_code = []
    return guards


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
