"""deepen, plan: the chosen positions as plain data that survives a JSON round trip.

A plan names positions (block or layer names), so a user can write it out (``--plan-out``),
edit it (drop a block, repeat a position for two blocks after it) and apply it again
(``--plan``). Applying checks every planned position against the model's own verdicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import ConfigError, PlanError
from ..plans import PLAN_VERSION, PlanFile, plan_entries, plan_input_shapes
from ..config import DeepenConfig, How
from .positions import CHOICES, Position, Reason


@dataclass(frozen=True)
class PlannedBlock:
    """One new block: of kind ``how`` ("copy" | "new"), after the position ``after``."""

    after: str
    how: str

    def __post_init__(self) -> None:
        if not isinstance(self.after, str) or not self.after:
            raise PlanError(f"a block's 'after' must name a block or layer, got {self.after!r}")
        if self.how not in (How.COPY, How.NEW):
            raise PlanError(f"block after {self.after}: how must be copy or new, got "
                            f"{self.how!r}")


@dataclass(frozen=True)
class DeepenPlan(PlanFile):
    """What ``deepen`` will insert: the config and one PlannedBlock per new block.

    Example:
        >>> plan = DeepenPlan(DeepenConfig(blocks=1), (PlannedBlock("blocks.1", "copy"),))
        >>> DeepenPlan.from_json(plan.to_json()) == plan
        True
    """

    config: DeepenConfig
    blocks: tuple[PlannedBlock, ...]
    input_shapes: tuple[tuple[int, ...], ...] = field(default=())

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "kind": "deepen", "config": self.config.to_dict(),
                "input_shapes": [list(s) for s in self.input_shapes],
                "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> "DeepenPlan":
        entries = plan_entries(data, "blocks", kind="a deepen plan", each="new block",
                               hint="ressurgeon deepen --plan-out")
        try:
            blocks = tuple(PlannedBlock(**b) for b in entries)
        except TypeError as exc:
            raise PlanError(f"a block in the plan has unknown or missing fields: {exc}") from exc
        shapes = plan_input_shapes(data)
        try:
            config = DeepenConfig.from_dict(data["config"])
        except ConfigError as exc:
            raise PlanError(f"the plan's config: {exc}") from exc
        return cls(config=config, blocks=blocks, input_shapes=shapes)



def plan_deepen(positions: list[Position], config: DeepenConfig,
                input_shapes: tuple[tuple[int, ...], ...] = ()) -> DeepenPlan:
    """The plan that inserts one block after every chosen position."""
    return DeepenPlan(config=config, input_shapes=tuple(input_shapes),
                      blocks=tuple(PlannedBlock(p.name, p.how.value)
                                   for p in positions if p.chosen))


def check_plan(positions: list[Position], plan: DeepenPlan) -> tuple[list[Position],
                                                                     list[Position]]:
    """(the positions to insert after, one per planned block; every position marked chosen or
    ``not-in-plan``) for a plan applied to this model.

    Raises:
        PlanError: a planned position is unknown here, of the other kind, or was rejected
            for a reason no plan can override (the copy would not be the identity).
    """
    by_name = {p.name: p for p in positions}
    planned = []
    for block in plan.blocks:
        pos = by_name.get(block.after)
        if pos is None:
            known = ", ".join(list(by_name)[:6])
            raise PlanError(f"the plan puts a block after {block.after!r}, which is no "
                            f"{block.how} position of this model (positions: {known}...)")
        if pos.how != block.how:
            raise PlanError(f"the plan asks for a {block.how} block after {block.after}, but "
                            f"this model takes {pos.how.value} blocks")
        if pos.reason is not None and pos.reason not in CHOICES:
            raise PlanError(f"no block can go after {block.after}: {pos.reason.text}"
                            + (f" ({pos.detail})" if pos.detail else ""))
        planned.append(replace(pos, reason=None))
    names = {b.after for b in plan.blocks}
    marked = [replace(p, reason=None) if p.name in names else
              replace(p, reason=Reason.NOT_IN_PLAN) if p.chosen or p.reason in CHOICES else p
              for p in positions]
    return planned, marked
