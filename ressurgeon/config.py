"""SkipConfig: what the pass should do, validated on construction.

Each field carries its own help text in ``metadata["help"]``; the CLI builds
its options from these fields so the two never drift apart.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields

from .errors import ConfigError

KINDS = ("auto", "identity", "projection")
INITS = ("preserve", "standard", "rezero")
PLACEMENTS = ("pre-activation", "post-activation")


def _help(text: str, **extra):
    return {"help": text, **extra}


@dataclass(frozen=True)
class SkipConfig:
    """How ``find_spans`` and ``add_skips`` choose and build shortcuts.

    Example:
        >>> SkipConfig(span=3, init="standard").span
        3
    """

    span: int = field(default=2, metadata=_help(
        "Layers a shortcut jumps (2 = ResNet's basic block). A layer is a weighted op "
        "with the norm and activation that follow it."))
    kind: str = field(default="auto", metadata=_help(
        "auto: identity when shapes match, projection when channels or stride differ; "
        "identity: never project; projection: always use a 1x1 projection.", choices=KINDS))
    init: str = field(default="preserve", metadata=_help(
        "preserve: H(x) + a*S(x), a=0, outputs unchanged (for trained models); "
        "standard: H(x) + S(x) (training from scratch); rezero: S(x) + a*H(x), a=0.",
        choices=INITS))
    placement: str = field(default="pre-activation", metadata=_help(
        "Where the sum goes: before the span's last activation (ResNet v1) or after it.",
        choices=PLACEMENTS))
    include: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob patterns on layer names (e.g. 'features.*'); when given, both ends of a "
        "shortcut must match one."))
    exclude: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob patterns on layer names; a shortcut with either end matching one is skipped."))
    max_skips: int | None = field(default=None, metadata=_help(
        "Insert at most this many shortcuts (the earliest in the graph win)."))

    def __post_init__(self) -> None:
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            raise ConfigError(f"span must be an integer >= 1, got {self.span!r}")
        for name, allowed in (("kind", KINDS), ("init", INITS), ("placement", PLACEMENTS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                # A bare string would be iterated per character: accept it as one pattern.
                object.__setattr__(self, name, (value,))
            else:
                object.__setattr__(self, name, tuple(value))
            if not all(isinstance(p, str) and p for p in getattr(self, name)):
                raise ConfigError(f"{name} must hold non-empty glob patterns, got {value!r}")
        if self.max_skips is not None and (
            isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int)
            or self.max_skips < 0
        ):
            raise ConfigError(f"max_skips must be an integer >= 0 or None, got {self.max_skips!r}")

    def allows(self, layer_name: str) -> bool:
        """True when the include/exclude patterns let a shortcut touch this layer."""
        if any(fnmatch.fnmatchcase(layer_name, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(layer_name, p) for p in self.include)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SkipConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SkipConfig field(s): {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)
