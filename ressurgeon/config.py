"""What the pass should do (``SkipConfig``, ``DeepenConfig``, ``RewireConfig``) and how to
capture the model (``TraceOptions``).

All are frozen dataclasses validated on construction. Each field carries its
own help text in ``metadata["help"]``; the CLI builds its options from these
fields so the two never drift apart. This module imports no torch, so the
CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum

from .catalog import JOINS, PATTERNS, REWIRINGS, join_entry, pattern_entry, rewiring_entry
from .errors import ConfigError


class Kind(StrEnum):
    """Which shortcut a span may get."""

    AUTO = "auto"              # identity when shapes match, projection otherwise
    IDENTITY = "identity"      # never project
    PROJECTION = "projection"  # always project


class Init(StrEnum):
    """How a new shortcut starts; ``formula`` is the text reports print."""

    PRESERVE = "preserve"
    STANDARD = "standard"
    REZERO = "rezero"
    MORPH = "morph"

    @property
    def formula(self) -> str:
        """The addition join's formula for this init (each join has its own: ``catalog.JOINS``)."""
        return JOINS["add"].formulas[self.value]


class Join(StrEnum):
    """The joins that ship with ressurgeon (``SkipConfig.join`` takes any registered in
    ``ressurgeon.catalog.JOINS``, these and a user's own)."""

    ADD = "add"            # ResNet, Transformer sublayers: h + S(x)
    CONCAT = "concat"      # DenseNet: x's features concatenated to the next layer's input
    HIGHWAY = "highway"    # Highway networks: T*h + (1-T)*S(x), T a learned gate


class Placement(StrEnum):
    """Where the sum goes relative to the span's last activation."""

    PRE = "pre-activation"
    POST = "post-activation"


def _help(text: str, **extra):
    return {"help": text, **extra}


def _enum(cls, name: str, value):
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ConfigError(f"{name} must be one of {allowed}; got {value!r}") from None


def _patterns(name: str, value) -> tuple[str, ...]:
    # A bare string would be iterated per character: accept it as one pattern.
    if value is not None and not isinstance(value, (str, list, tuple)):
        raise ConfigError(f"{name} must hold non-empty glob patterns, got {value!r}")
    items = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(p, str) and p for p in items):
        raise ConfigError(f"{name} must hold non-empty glob patterns, got {value!r}")
    return items


def _count(name: str, value, *, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or None" if optional else ""
        raise ConfigError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


_MODULE_HELP = (
    "Rewrite only this submodule (its dotted path, e.g. 'backbone') and splice it back into "
    "a copy of the model, which keeps its class, methods and other submodules; for models "
    "torch.fx cannot trace as a whole whose {what} belong in a part that traces.")


def _module_path(value) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or not all(
            part.isidentifier() or part.isdigit() for part in value.split(".")):
        raise ConfigError(f"module must be a submodule's dotted path, e.g. 'backbone' or "
                          f"'model.encoder', got {value!r}")


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
    kind: Kind = field(default=Kind.AUTO, metadata=_help(
        "auto: identity when shapes match, projection when channels or stride differ; "
        "identity: never project; projection: always use a 1x1 projection.", choices=Kind))
    init: Init = field(default=Init.PRESERVE, metadata=_help(
        "preserve: h + a*S(x), a=0, outputs unchanged (for trained models); "
        "standard: h + S(x) (training from scratch); rezero: S(x) + a*h, a=0; "
        "morph: (1-c+a)*h + c*S(x), a=c=0, outputs unchanged, then c ramps to 1 while "
        "fine-tuning (ressurgeon.training.ShortcutRamp).",
        choices=Init))
    join: str = field(default="add", metadata=_help(
        "How the shortcut meets the span: " + "; ".join(
            f"{name}: {entry.help}" for name, entry in JOINS.items()) + ".", choices=JOINS))
    pattern: str = field(default="chain", metadata=_help(
        "Which pairs of tensors get joined: " + "; ".join(
            f"{name}: {entry.help}" for name, entry in PATTERNS.items()) + ".",
        choices=PATTERNS))
    placement: Placement = field(default=Placement.PRE, metadata=_help(
        "Where the sum goes: before the span's last activation (ResNet v1) or after it.",
        choices=Placement))
    include: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob patterns on layer names (e.g. 'features.*'); when given, both ends of a "
        "shortcut must match one."))
    exclude: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob patterns on layer names; a shortcut with either end matching one is skipped."))
    max_skips: int | None = field(default=None, metadata=_help(
        "Insert at most this many shortcuts (the earliest in the graph win)."))
    max_projection_share: float | None = field(default=0.25, metadata=_help(
        "Skip a projection of 1M+ parameters that alone would add more than this share of "
        "the model's parameters (0.25: 25%; reason large-projection); None (CLI: 0 or less) "
        "for no limit. "
        "A classifier-sized projection (vgg11_bn: +102.9M, +77%) is rarely wanted; a plain "
        "ResNet-50's last stage projection (as ResNet has it) is about 10%."))
    seed: int | None = field(default=None, metadata=_help(
        "Seed for the new random weights (projections, highway transforms, concat's standard "
        "columns): two runs with one seed write the same weights. None: torch's global RNG."))
    module: str | None = field(default=None, metadata=_help(
        _MODULE_HELP.format(what="shortcuts")))

    def __post_init__(self) -> None:
        _count("span", self.span, low=1)
        _module_path(self.module)
        for name, cls in (("kind", Kind), ("init", Init), ("placement", Placement)):
            object.__setattr__(self, name, _enum(cls, name, getattr(self, name)))
        join = join_entry(self.join)  # a registered join, built in or a user's
        object.__setattr__(self, "join", join.name)
        object.__setattr__(self, "pattern", pattern_entry(self.pattern).name)
        if self.init.value not in join.formulas:
            why = join.refused.get(self.init.value, "use one of " + ", ".join(join.inits))
            raise ConfigError(f"init {self.init.value} has no {join.name} form: {why}")
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        _count("max_skips", self.max_skips, low=0, optional=True)
        _count("seed", self.seed, low=0, optional=True)
        share = self.max_projection_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not share > 0):
            raise ConfigError(f"max_projection_share must be a number > 0 or None, got {share!r}")

    def allows(self, layer_name: str) -> bool:
        """True when the include/exclude patterns let a shortcut touch this layer."""
        if any(fnmatch.fnmatchcase(layer_name, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(layer_name, p) for p in self.include)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SkipConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TraceOptions:
    """How ``trace_model`` captures a model; every entry point that traces takes one.

    Example:
        >>> TraceOptions(leaf_modules=("blocks.*.attn",), fake=True).fake
        True
    """

    leaf_modules: tuple[str, ...] = field(default=(), metadata=_help(
        "Glob on module names or class names that tracing keeps opaque (call them, do not "
        "trace inside)."))
    concrete_args: dict | None = field(default=None, compare=False, metadata=_help(
        "Values for non-tensor forward arguments (flags, modes), baked into the graph as for "
        "torch.fx.symbolic_trace."))
    fake: bool = field(default=False, metadata=_help(
        "Record shapes with FakeTensors (no activation memory, no arithmetic) instead of "
        "running the graph."))
    dynamic_batch: bool = field(default=True, metadata=_help(
        "When torch.export captures the model, keep dim 0 of the batched inputs symbolic."))
    dynamic: tuple[tuple[int | None, int], ...] = field(default=(), metadata=_help(
        "More dims torch.export must keep symbolic (e.g. the sequence dim): (input, dim) "
        "pairs, input None for every input; a bare dim number means (None, dim)."))
    split_recurrent: bool = field(default=True, metadata=_help(
        "Split each multi-layer nn.LSTM/GRU/RNN into single-layer modules holding the same "
        "weights (exact), so that shortcuts can go between its layers."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", _patterns("leaf_modules", self.leaf_modules))
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise ConfigError("concrete_args must be a dict of forward argument values, got "
                              f"{type(self.concrete_args).__name__}")
        for name in ("fake", "dynamic_batch", "split_recurrent"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "dynamic", _dynamic_pairs(self.dynamic))


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
    module: str | None = field(default=None, metadata=_help(
        _MODULE_HELP.format(what="new blocks")))
    prefix: str | None = field(default=None, metadata=_help(
        "Hugging Face models and checkpoint folders only: the layer list to grow, e.g. "
        "'encoder.block' or 'decoder.layers' for encoder-decoders (T5, BART, Whisper, CLIP) "
        "whose lists are nested; default: the one layer stack found."))

    def __post_init__(self) -> None:
        _count("blocks", self.blocks, low=1, optional=True)
        _module_path(self.module)
        if self.prefix is not None and not (
                isinstance(self.prefix, str)
                and re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*", self.prefix.rstrip("."))):
            raise ConfigError(f"prefix must be a dotted module path such as 'encoder.block', "
                              f"got {self.prefix!r}")
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


# The rewiring kinds ``rewire`` knows (their modules: ``ressurgeon/rewire/<kind>.py``); listed
# here, torch-free, so that the config and the CLI can check a kind without importing torch.
# the rewiring kinds a user can name (``ressurgeon.catalog.REWIRINGS``, built in and registered)
REWIRE_KINDS = REWIRINGS


@dataclass(frozen=True)
class RewireConfig:
    """How ``rewire`` enriches the residual stream of a model that already has one.

    Example:
        >>> RewireConfig(kind="dwa", dilation=4, period=5).kind
        'dwa'
        >>> RewireConfig(kind="hyper", n=2, dynamic=True).n
        2
    """

    kind: str = field(default="dwa", metadata=_help(
        "dwa: DenseFormer's depth-weighted average, after block i the stream is a learned "
        "average of the embedding and every earlier block's output (Pagliardini et al. 2024); "
        "hyper: hyper-connections, the stream widened to n copies that each sublayer reads and "
        "writes with learned weights (Zhu et al. 2025).", choices=REWIRE_KINDS))
    dilation: int = field(default=1, metadata=_help(
        "dwa: block i averages only the outputs j with (i - j) divisible by this (the "
        "paper's k; 1 = every earlier output)."))
    period: int = field(default=1, metadata=_help(
        "dwa: an average only after every p-th block (the paper's p; 1 = after every block). "
        "The paper's cheaper setting is dilation 4, period 5 ('4x5-DenseFormer')."))
    n: int = field(default=4, metadata=_help(
        "hyper: the expansion rate, how many copies of the stream (the paper uses 2 or 4)."))
    dynamic: bool = field(default=False, metadata=_help(
        "hyper: add the input-dependent terms (dynamic hyper-connections), initialised at 0 so "
        "the model is unchanged at insertion."))
    mhc: bool = field(default=False, metadata=_help(
        "hyper: keep the stream-mixing matrix doubly stochastic by a Sinkhorn projection "
        "(DeepSeek's manifold-constrained mHC). Not exact at insertion: the report gives the "
        "measured difference."))
    inplace: bool = field(default=False, metadata=_help(
        "Rewire the model passed in instead of a copy (no second copy of the weights in "
        "memory, for large models); the model passed in is changed."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", rewiring_entry(self.kind).name)
        _count("dilation", self.dilation, low=1)
        _count("period", self.period, low=1)
        _count("n", self.n, low=1)
        for name in ("dynamic", "mhc", "inplace"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kind != "hyper" and (self.dynamic or self.mhc or self.n != 4):
            raise ConfigError("n, dynamic and mhc apply to kind='hyper' only")
        if self.kind != "dwa" and (self.dilation != 1 or self.period != 1):
            raise ConfigError("dilation and period apply to kind='dwa' only")

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RewireConfig":
        return _from_dict(cls, data)


def _dynamic_pairs(value) -> tuple[tuple[int | None, int], ...]:
    """(input, dim) pairs from a dim, a list of dims or pairs, or {input: dims}."""
    if isinstance(value, dict):
        value = [(i, d) for i, dims in value.items()
                 for d in ((dims,) if isinstance(dims, int) else dims)]
    elif isinstance(value, int):
        value = [value]
    pairs = []
    for item in value or ():
        pair = (None, item) if isinstance(item, int) else tuple(item)
        if len(pair) != 2 or not all(v is None or (type(v) is int) for v in pair) \
                or pair[1] is None or (pair[0] is not None and pair[0] < 0):
            raise ConfigError(f"dynamic must hold dims or (input, dim) pairs, e.g. (1,) or "
                              f"((0, 1),); got {value!r}")
        pairs.append(pair)
    return tuple(pairs)


def _to_dict(obj) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else (
            value.value if isinstance(value, StrEnum) else value)
    return out


def _from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} is a JSON object of fields, got "
                          f"{type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(map(str, unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)
