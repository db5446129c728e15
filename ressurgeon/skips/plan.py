"""Stage 3b, plan: the chosen spans as plain data that survives a JSON round trip.

A plan names nodes of the traced graph, so a user can write it out, edit it
(drop a shortcut, move an end) and apply it again to the same model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import SkipConfig
from ..errors import ConfigError, PlanError
from .select import Span

from ..plans import (MAX_DIM, MAX_PLAN_BYTES, PLAN_VERSION, PlanFile,  # noqa: F401
                     parse_plan_json, plan_entries, plan_input_shapes, read_plan_text)


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
    fit: bool = False            # crop or zero-pad x to the join's spatial size at run time

    def __post_init__(self) -> None:
        for name in ("source", "target", "source_layer", "target_layer", "consumer"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"a skip's {name} must be a string (a node or layer name), got "
                                f"{getattr(self, name)!r}")
        if not isinstance(self.fit, bool):
            raise PlanError(f"skip {self.source} -> {self.target}: fit must be true or false, "
                            f"got {self.fit!r}")
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
class SurgeryPlan(PlanFile):
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
                "skips": [_entry(s) for s in self.skips]}

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
                              target_layer=s.target_layer, consumer=s.consumer or "",
                              fit=s.fit)
                  for s in spans if s.chosen)
    return SurgeryPlan(config=config, skips=skips, input_shapes=tuple(input_shapes))


def _entry(skip: PlannedSkip) -> dict:
    """A skip as JSON; ``fit`` only where it is set (plans of the previous release lack it)."""
    entry = asdict(skip)
    if not skip.fit:
        del entry["fit"]
    return entry
