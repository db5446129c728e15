"""Deepen: a model -> a deeper model whose new blocks start as the identity (LLaMA Pro).

``expand_checkpoint`` works on a safetensors checkpoint folder on disk, tensor by
tensor, for models larger than memory (``stream.py``).
"""

from __future__ import annotations

from .stream import DEFAULT_MAX_SHARD_BYTES, ZERO_RULES, ExpansionReport, expand_checkpoint

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ZERO_RULES", "ExpansionReport", "expand_checkpoint"]
