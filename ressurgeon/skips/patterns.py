"""The pattern protocol: which pairs of tensors a method proposes to join.

A pattern is one class in one file, registered in ``ressurgeon.catalog.PATTERNS``
under ``name`` (what ``SkipConfig(pattern=...)`` and ``--pattern`` take). Its
``select(analysis, config)`` returns every candidate it considered as a
``Span``: chosen, or rejected with a ``Reason``, so ``inspect`` can explain each.
The join of ``config.join`` judges each pair (``join.verdict``) and later
builds and inserts the shortcut; a pattern only proposes and chooses.

- ``Chain`` (here, its algorithm in ``select.py``): ResNet's spans along the
  layer tree, ``config.span`` units each, tiled without overlap.
"""

from __future__ import annotations

from typing import ClassVar

from ..analysis.layers import GraphAnalysis
from ..config import SkipConfig
from ..verdicts import Span
from .select import chain_spans


class Pattern:
    """Base class of a pattern: override ``select``."""

    name: ClassVar[str] = ""

    @classmethod
    def select(cls, analysis: GraphAnalysis, config: SkipConfig) -> list[Span]:
        raise NotImplementedError


class Chain(Pattern):
    """Spans of ``config.span`` layers along the layer tree (today's default)."""

    name = "chain"

    @classmethod
    def select(cls, analysis: GraphAnalysis, config: SkipConfig) -> list[Span]:
        return chain_spans(analysis, config)
