"""What every plan file shares, whichever method wrote it (add-skips' ``SurgeryPlan``,
deepen's ``DeepenPlan``): the format version, a bounded read, the JSON object and its
list of entries, and the example input shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PlanError, brief

PLAN_VERSION = 1
MAX_PLAN_BYTES = 16 * 2 ** 20    # a plan is a few KB; anything this big is not one
MAX_DIM = 2 ** 31 - 1


def plan_entries(data, key: str, *, kind: str, each: str, hint: str) -> list[dict]:
    """The list of objects under ``key`` in a plan read from JSON, after checking the
    parts every plan kind shares: an object with 'config' and ``key``, a version this
    ressurgeon writes, ``key`` a list of objects (one per ``each``)."""
    if not isinstance(data, dict) or key not in data or "config" not in data:
        raise PlanError(f"{kind} is a JSON object with 'config' and '{key}'; "
                        f"write one with {hint}")
    if data.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise PlanError(f"plan version {data.get('version')} is not supported "
                        f"(this ressurgeon writes version {PLAN_VERSION})")
    entries = data[key]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PlanError(f"the plan's '{key}' must be a list of objects, one per {each}; "
                        f"write one with {hint}")
    return entries


def plan_input_shapes(data: dict) -> tuple[tuple[int, ...], ...]:
    """A plan's ``input_shapes`` (missing or empty: --input-shape gives them), checked."""
    shapes = data.get("input_shapes") or []
    if not isinstance(shapes, list) or not all(
            isinstance(s, list) and s and all(type(d) is int and 0 < d <= MAX_DIM for d in s)
            for s in shapes):
        raise PlanError("the plan's input_shapes must be a list of shapes of positive "
                        f"integers, e.g. [[1, 3, 32, 32]]; got {str(shapes)[:80]}")
    return tuple(tuple(s) for s in shapes)


def read_plan_text(path: str | Path) -> str:
    """A plan file's text: a regular UTF-8 file of plan size, or a PlanError naming the fix."""
    path = Path(path)
    try:
        if not path.is_file():
            raise PlanError(f"the plan {path} is not a regular file; give the JSON file "
                            "--plan-out wrote")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"the plan {path} is {path.stat().st_size:,} bytes, too large to "
                            f"be a plan (at most {MAX_PLAN_BYTES:,}); give the file "
                            "--plan-out wrote")
        with path.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"the plan {path} is not UTF-8 text; give the JSON file --plan-out "
                        "wrote") from None


def parse_plan_json(text: str):
    """JSON text -> data, or a PlanError that says where the JSON breaks."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"the plan is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits()
        raise PlanError(f"the plan holds a number too long to be a plan value ({brief(exc, 60)});"
                        " write one with --plan-out") from None
    except RecursionError:
        raise PlanError("the plan is nested too deeply to be a plan; write one with "
                        "--plan-out") from None


class PlanFile:
    """The base of every plan class (``SurgeryPlan``, ``DeepenPlan``): JSON out and in.

    A subclass gives ``to_dict`` and ``from_dict`` (its own entries, checked with
    ``plan_entries``); the text form, the bounded read and the parse are shared.
    """

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict):
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(parse_plan_json(text))

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_json(read_plan_text(path))
