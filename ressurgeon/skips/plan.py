"""Stage 3b, plan: the chosen spans as plain data that survives a JSON round trip.

A plan names nodes of the traced graph, so a user can write it out, edit it
(drop a shortcut, move an end) and apply it again to the same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import SkipConfig
from ..errors import ConfigError, PlanError
from .select import Span

PLAN_VERSION = 1
MAX_PLAN_BYTES = 16 * 2 ** 20    # a plan is a few KB; anything this big is not one
MAX_DIM = 2 ** 31 - 1


@dataclass(frozen=True)
class PlannedSkip:
    """One shortcut to insert: read ``source``'s output and join it to ``target``'s.

    For the add and highway joins the sum replaces ``target``; for concat,
    ``target`` is the input of the layer at ``consumer``, which is widened to
    read ``source``'s features too (``stride``: their average-pooling factor).
    """

    source: str
    target: str
    kind: str                    # "identity" | "projection" | "concat"
    stride: int = 1
    channel_axis: int = 1
    source_layer: str = ""
    target_layer: str = ""
    consumer: str = ""           # concat only: the node of the layer that takes the features

    def __post_init__(self) -> None:
        for name in ("source", "target", "source_layer", "target_layer", "consumer"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"a skip's {name} must be a string (a node or layer name), got "
                                f"{getattr(self, name)!r}")
        if type(self.channel_axis) is not int:
            raise PlanError(f"skip {self.source} -> {self.target}: channel_axis must be an "
                            f"integer (1 or -1), got {self.channel_axis!r}")
        if self.kind not in ("identity", "projection", "concat"):
            raise PlanError(f"skip {self.source} -> {self.target}: kind must be identity, "
                            f"projection or concat, got {self.kind!r}")
        if (self.kind == "concat") != bool(self.consumer):
            raise PlanError(f"skip {self.source} -> {self.target}: a concat skip names its "
                            "consumer node, other kinds none")
        if type(self.stride) is not int or not 1 <= self.stride <= MAX_DIM:
            raise PlanError(f"skip {self.source} -> {self.target}: stride must be an integer "
                            f">= 1, got {self.stride!r}")
        if self.kind == "identity" and self.stride != 1:
            raise PlanError(f"skip {self.source} -> {self.target}: an identity shortcut "
                            "cannot have a stride; use kind projection")


@dataclass(frozen=True)
class SurgeryPlan:
    """What the rewrite will do: the config (init, placement) and the shortcuts.

    Example:
        >>> plan = plan_skips(spans, SkipConfig())            # doctest: +SKIP
        >>> SurgeryPlan.from_json(plan.to_json()) == plan     # doctest: +SKIP
        True
    """

    config: SkipConfig
    skips: tuple[PlannedSkip, ...]
    input_shapes: tuple[tuple[int, ...], ...] = field(default=())

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "config": self.config.to_dict(),
                "input_shapes": [list(s) for s in self.input_shapes],
                "skips": [asdict(s) for s in self.skips]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "SurgeryPlan":
        entries = plan_entries(data, "skips", kind="a plan", each="shortcut",
                               hint="--plan-out")
        try:
            skips = tuple(PlannedSkip(**s) for s in entries)
        except TypeError as exc:
            raise PlanError(f"a skip in the plan has unknown or missing fields: {exc}") from exc
        except PlanError as exc:
            raise PlanError(f"in the plan: {exc}") from exc
        shapes = plan_input_shapes(data)
        if not isinstance(data["config"], dict):
            raise PlanError("the plan's 'config' must be an object of SkipConfig fields, e.g. "
                            '{"span": 2, "init": "preserve"}; write one with --plan-out')
        try:
            config = SkipConfig.from_dict(data["config"])
        except ConfigError as exc:
            raise PlanError(f"the plan's config: {exc}") from exc
        return cls(config=config, skips=skips, input_shapes=shapes)

    @classmethod
    def from_json(cls, text: str) -> "SurgeryPlan":
        return cls.from_dict(parse_plan_json(text))

    @classmethod
    def load(cls, path: str | Path) -> "SurgeryPlan":
        return cls.from_json(read_plan_text(path))


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
    except RecursionError:
        raise PlanError("the plan is nested too deeply to be a plan; write one with "
                        "--plan-out") from None


def plan_skips(spans: list[Span], config: SkipConfig,
               input_shapes: tuple[tuple[int, ...], ...] = ()) -> SurgeryPlan:
    """The plan that inserts one shortcut for every chosen span.

    Args:
        spans: candidates from ``find_spans`` / ``select_spans``.
        config: the config the spans were selected with (its init and placement travel along).
        input_shapes: recorded so the plan can be re-applied with the same inputs.

    Returns:
        A SurgeryPlan; ``apply_plan`` executes it.
    """
    skips = tuple(PlannedSkip(source=s.source, target=s.target, kind=s.kind, stride=s.stride,
                              channel_axis=s.channel_axis, source_layer=s.source_layer,
                              target_layer=s.target_layer, consumer=s.consumer or "")
                  for s in spans if s.chosen)
    return SurgeryPlan(config=config, skips=skips, input_shapes=tuple(input_shapes))
