"""What ``deepen`` should do: how many new blocks, of which kind, where (``DeepenConfig``).

A frozen dataclass validated on construction, like ``SkipConfig``; each field carries its help
text in ``metadata["help"]`` and the CLI builds its options from them. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..config import _count, _enum, _from_dict, _help, _patterns, _to_dict
from ..errors import ConfigError


class How(StrEnum):
    """Which kind of new block ``deepen`` inserts."""

    AUTO = "auto"   # copy where the model has stacks of residual blocks, new otherwise
    COPY = "copy"   # block expansion: copies of existing residual blocks (LLaMA Pro)
    NEW = "new"     # new residual layers after the layers of a plain network


@dataclass(frozen=True)
class DeepenConfig:
    """How ``deepen`` grows a network.

    Example:
        >>> DeepenConfig(blocks=8).how
        <How.AUTO: 'auto'>
        >>> DeepenConfig(where=("blocks.1", "blocks.3")).blocks is None
        True
    """

    blocks: int | None = field(default=None, metadata=_help(
        "How many new blocks, spread evenly over the positions (LLaMA Pro: one after every "
        "k-th block). Default: one after each position --where names."))
    how: How = field(default=How.AUTO, metadata=_help(
        "copy: insert copies of existing residual blocks whose branch ends are zeroed "
        "(transformer layers, ResNet/ConvNeXt/ViT blocks; LLaMA Pro's block expansion); "
        "new: insert new residual layers x + out(act(layer(x))) with out zeroed, for plain "
        "networks; auto: copy when the model has residual blocks, else new.", choices=How))
    where: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob patterns on positions: block names for copy (e.g. 'blocks.3', "
        "'model.layers.*'), layer names for new (e.g. 'features.*'). Only matching positions "
        "get new blocks."))
    zero: tuple[str, ...] = field(default=(), metadata=_help(
        "Hugging Face models and checkpoint folders only: the modules to zero in each copy, "
        "relative to a block (e.g. 'self_attn.o_proj'); default: the family's rule in "
        "ressurgeon.deepen.ZERO_RULES."))

    def __post_init__(self) -> None:
        _count("blocks", self.blocks, low=1, optional=True)
        object.__setattr__(self, "how", _enum(How, "how", self.how))
        for name in ("where", "zero"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        if self.blocks is None and not self.where:
            raise ConfigError("say how many new blocks (blocks=N, --blocks N) or where they go "
                              "(where=[...], --where PATTERN)")

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeepenConfig":
        return _from_dict(cls, data)
