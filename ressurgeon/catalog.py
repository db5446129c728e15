"""The residual families, by name: joins, patterns and rewirings (torch-free).

A family is one class in one file of its package, registered here under the
name a user types (``SkipConfig(join=...)``, ``--join``, ``--pattern``,
``--kind``). An entry says what the command line and the config need to know
without importing torch (name, help, which inits a join allows and their
formulas) and where the class lives (``"package.module:Class"``); the class is
imported the first time a stage asks for it, so ``ressurgeon --help`` stays
torch-free and a family registered by a user's own code is accepted like the
built-in ones.

Three extension points, each a table and a small protocol:

- **join** (``JOINS``): how a span's output ``h`` meets its input ``x``
  (``h + a*S(x)``, a concatenation into the next layer, a highway gate). The
  class is the shortcut ``nn.Module`` itself and owns everything particular to
  it: see ``ressurgeon.shortcuts.base.JoinModule``.
- **pattern** (``PATTERNS``): which pairs of tensors get joined (the chain of
  spans along the layer tree; the mirror pairs of an encoder-decoder). See
  ``ressurgeon.skips.patterns.Pattern``.
- **rewiring** (``REWIRINGS``): changes a residual stream that already exists
  (DenseFormer's depth-weighted average, hyper-connections). See
  ``ressurgeon.rewire``.

Example:
    >>> sorted(JOINS)[:3]
    ['add', 'concat', 'highway']
    >>> JOINS["add"].formulas["preserve"]
    'h + a*S(x)'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import ConfigError

__all__ = ["Entry", "JoinEntry", "JOINS", "PATTERNS", "REWIRINGS", "register_join",
           "register_pattern", "register_rewiring", "join_entry", "pattern_entry",
           "rewiring_entry", "join_class", "pattern_class", "rewiring_class"]


@dataclass(frozen=True)
class Entry:
    """A registered family: its name, one line of help, and where its class lives."""

    name: str
    target: str                     # "package.module:Class", imported on first use
    help: str

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.replace("-", "_").isidentifier()):
            raise ConfigError(f"a family name must be a word (letters, digits, - or _), "
                              f"got {self.name!r}")
        module, sep, attr = self.target.partition(":")
        if not sep or not all(p.isidentifier() for p in (*module.split("."), attr)):
            raise ConfigError(f"target must be 'package.module:Class', got {self.target!r}")

    def load(self) -> type:
        """The class itself (imports its module the first time)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class JoinEntry(Entry):
    """A join: the inits it allows, each with the formula reports print.

    ``refused`` says, for an init the join has no form of, why not and what to
    use instead (the message ``SkipConfig`` raises).
    """

    formulas: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.formulas:
            raise ConfigError(f"join {self.name!r} must allow at least one init")
        object.__setattr__(self, "formulas", MappingProxyType(dict(self.formulas)))
        object.__setattr__(self, "refused", MappingProxyType(dict(self.refused)))

    @property
    def inits(self) -> tuple[str, ...]:
        return tuple(self.formulas)


JOINS: dict[str, JoinEntry] = {}
PATTERNS: dict[str, Entry] = {}
REWIRINGS: dict[str, Entry] = {}


def _register(table: dict, entry: Entry, kind: str, replace: bool) -> Entry:
    old = table.get(entry.name)
    if old is not None and old != entry and not replace:
        raise ConfigError(f"a {kind} named {entry.name!r} is already registered "
                          f"({old.target}); pass replace=True to override it")
    table[entry.name] = entry
    return entry


def register_join(entry: JoinEntry, *, replace: bool = False) -> JoinEntry:
    """Make a join available to ``SkipConfig(join=...)``, ``--join`` and every stage.

    Example:
        >>> register_join(JoinEntry("scaled", "my_joins:ScaledAdd", "h + 0.5*a*S(x)",
        ...                         formulas={"preserve": "h + 0.5*a*S(x)"}))  # doctest: +SKIP
    """
    return _register(JOINS, entry, "join", replace)


def register_pattern(entry: Entry, *, replace: bool = False) -> Entry:
    """Make a pattern available to ``SkipConfig(pattern=...)`` and ``--pattern``."""
    return _register(PATTERNS, entry, "pattern", replace)


def register_rewiring(entry: Entry, *, replace: bool = False) -> Entry:
    """Make a rewiring kind available to ``RewireConfig(kind=...)`` and ``rewire --kind``."""
    return _register(REWIRINGS, entry, "rewiring", replace)


def _entry(table: dict, kind: str, name) -> Entry:
    entry = table.get(str(name))
    if entry is None:
        raise ConfigError(f"{kind} must be one of {', '.join(sorted(table))}; got {name!r}")
    return entry


def join_entry(name: str) -> JoinEntry:
    return _entry(JOINS, "join", name)


def pattern_entry(name: str) -> Entry:
    return _entry(PATTERNS, "pattern", name)


def rewiring_entry(name: str) -> Entry:
    return _entry(REWIRINGS, "kind", name)


def join_class(name: str) -> type:
    """The shortcut module class of a registered join."""
    return join_entry(name).load()


def pattern_class(name: str) -> type:
    return pattern_entry(name).load()


def rewiring_class(name: str) -> type:
    return rewiring_entry(name).load()


# -- the families that ship with ressurgeon --------------------------------------------------

_ADD_FORMULAS = {"preserve": "h + a*S(x)", "standard": "h + S(x)", "rezero": "S(x) + a*h",
                 "morph": "(1-c+a)*h + c*S(x)"}
_NO_MORPH = "morph ramps an addition open; use preserve (exact) or standard"

register_join(JoinEntry(
    "add", "ressurgeon.shortcuts.add:Shortcut",
    "h + S(x) (ResNet)", formulas=_ADD_FORMULAS))
register_join(JoinEntry(
    "concat", "ressurgeon.shortcuts.concat:ConcatJoin",
    "x's features concatenated to the input of the next weighted layer, widened with zero "
    "weights (DenseNet)",
    formulas=dict.fromkeys(("preserve", "standard"), "W [h; pool(x)]: x's features join the "
                           "next layer's input (new weights from 0)"),
    refused={"rezero": "the span cannot be bypassed by a concatenation; use preserve (zero "
                       "weights, exact) or standard",
             "morph": _NO_MORPH}))
register_join(JoinEntry(
    "highway", "ressurgeon.shortcuts.highway:HighwayShortcut",
    "T*h + (1-T)*S(x) with T = sigmoid(W_T x + b_T) per channel (Highway networks)",
    formulas={"preserve": "h + g*(1-T)*(S(x)-h), T = sigmoid(W_T x + b_T)",
              "standard": "T*h + (1-T)*S(x), T = sigmoid(W_T x + b_T)",
              "rezero": "S(x) + g*T*(h-S(x)), T = sigmoid(W_T x + b_T)"},
    refused={"morph": _NO_MORPH}))

register_pattern(Entry(
    "chain", "ressurgeon.skips.patterns:Chain",
    "spans of `span` layers along the layer tree, each from a layer's input to a later "
    "layer's output (ResNet)"))
register_pattern(Entry(
    "mirror", "ressurgeon.skips.mirror:Mirror",
    "in an encoder-decoder, each encoder level's last tensor joined to the first tensor of the "
    "decoder level of its resolution, outermost to outermost (U-Net with --join concat, "
    "LinkNet with --join add)"))

register_rewiring(Entry(
    "dwa", "ressurgeon.rewire.dwa:DWA",
    "DenseFormer's depth-weighted average: after block i, a learned mix of the embedding and "
    "every earlier block's output (Pagliardini et al. 2024)"))
register_rewiring(Entry(
    "hyper", "ressurgeon.rewire.hyper:Hyper",
    "hyper-connections: n copies of the stream, each block reads a learned mix and writes "
    "back with learned weights (Zhu et al. 2025)"))
