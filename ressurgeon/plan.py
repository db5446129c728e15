"""Stage 3b, plan: the chosen spans as plain data that survives a JSON round trip.

A plan names nodes of the traced graph, so a user can write it out, edit it
(drop a shortcut, move an end) and apply it again to the same model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import SkipConfig
from .errors import PlanError
from .spans import Span

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlannedSkip:
    """One shortcut to insert: read ``source``'s output, add it to ``target``'s."""

    source: str
    target: str
    kind: str                    # "identity" | "projection"
    stride: int = 1
    channel_axis: int = 1
    source_layer: str = ""
    target_layer: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("identity", "projection"):
            raise PlanError(f"skip {self.source} -> {self.target}: kind must be identity or "
                            f"projection, got {self.kind!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
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
        if not isinstance(data, dict) or "skips" not in data or "config" not in data:
            raise PlanError("a plan is a JSON object with 'config' and 'skips'; "
                            "write one with --plan-out")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')} is not supported "
                            f"(this ressurgeon writes version {PLAN_VERSION})")
        try:
            skips = tuple(PlannedSkip(**s) for s in data["skips"])
        except TypeError as exc:
            raise PlanError(f"a skip in the plan has unknown or missing fields: {exc}") from exc
        shapes = data.get("input_shapes", ())
        if not isinstance(shapes, list) or not all(
                isinstance(s, list) and s and all(type(d) is int and d > 0 for d in s)
                for s in shapes):
            raise PlanError("the plan's input_shapes must be a list of shapes of positive "
                            f"integers, e.g. [[1, 3, 32, 32]]; got {shapes!r}")
        return cls(config=SkipConfig.from_dict(data["config"]), skips=skips,
                   input_shapes=tuple(tuple(s) for s in shapes))

    @classmethod
    def from_json(cls, text: str) -> "SurgeryPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "SurgeryPlan":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from exc
        return cls.from_json(text)


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
                              target_layer=s.target_layer)
                  for s in spans if s.chosen)
    return SurgeryPlan(config=config, skips=skips, input_shapes=tuple(input_shapes))
