"""Gate report: which shortcuts did fine-tuning adopt?

``gate_report`` reads the current value of every shortcut gate of a
rewritten (and perhaps fine-tuned) model: a module with Shortcut submodules,
a GraphModule loaded from a .pt2 archive (where the shortcuts are inlined
into plain ops), or a bare state_dict. Nothing here prints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import fx

from .errors import ConfigError
from .skips.rewrite import name_part
from .catalog import JOINS
from .shortcuts import find_shortcuts, is_shortcut

@dataclass(frozen=True)
class Gate:
    """One shortcut of a rewritten model and its gate's current value.

    ``value`` multiplies the shortcut (init "preserve": ``h + a*S(x)``) or the
    span (init "rezero": ``S(x) + a*H(x)``); it is None for init "standard",
    which has no gate. ``init`` is None when it cannot be told from the file.
    """

    name: str                    # the shortcut's module path, e.g. "skip_0__4"
    source_layer: str
    target_layer: str
    init: str | None
    kind: str                    # "identity" | "projection"
    value: float | None
    ramp: float | None = None    # init "morph": how far the shortcut is open (0..1)
    join: str = "add"            # "add", "highway" (value: max |g|), "concat" (max |new weight|)

    @property
    def formula(self) -> str | None:
        entry = JOINS.get(self.join) if self.init else None  # each join states its formulas
        return entry.formulas.get(self.init) if entry is not None else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateReport:
    """Every shortcut found in a model; ``flattened`` when read from inlined graph ops."""

    gates: tuple[Gate, ...]
    flattened: bool = False

    @property
    def values(self) -> dict[str, float]:
        """{shortcut name: gate value} for the shortcuts that have a gate."""
        return {g.name: g.value for g in self.gates if g.value is not None}

    def to_dict(self) -> dict:
        return {"gates": [g.to_dict() for g in self.gates], "flattened": self.flattened}


_SKIP_PARAM = re.compile(r"^(?P<path>(?:.*\.)?skip_[^.]+)\.(?P<leaf>gate|ramp|proj\.weight)$")


def gate_report(module: nn.Module | Mapping[str, torch.Tensor]) -> GateReport:
    """Every shortcut of a rewritten model with its gate's current value.

    Works on the module ``add_skips`` returned (and one pickled whole), on a
    model loaded from a ``.pt2`` archive (``load_model`` turns the ops
    torch.export inlined back into Shortcut modules; a raw ``ep.module()`` is
    read through the same recogniser, ``find_shortcuts``), and on a
    state_dict (names and values only: init unknown, identity shortcuts of
    init "standard" invisible, since they own no tensor).

    Args:
        module: a rewritten nn.Module, or a state_dict of one.

    Returns:
        GateReport with one Gate per shortcut, in graph order where a graph is
        known (parameter order for a state_dict).

    Raises:
        ConfigError: ``module`` is neither an nn.Module nor a mapping of tensors.

    Example:
        >>> tuned = add_skips(model, (x,), SkipConfig(init="preserve")).module  # doctest: +SKIP
        >>> ...  # fine-tune tuned                                               # doctest: +SKIP
        >>> gate_report(tuned).values                                             # doctest: +SKIP
        {'skip_0__4': 0.31, 'skip_4__8': -0.02}
    """
    if isinstance(module, Mapping):
        tensors = dict(module)
        paths = _prefixes(tensors)
        gates = [_flat_gate(path, tensors, paths) for path in _skip_paths(tensors)]
        return GateReport(gates=tuple(gates), flattened=True)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"gate_report needs an nn.Module or a state_dict, got "
                          f"{type(module).__name__}")
    tensors = dict(module.state_dict(keep_vars=True))
    paths = _prefixes(tensors) | {name for name, _ in module.named_modules()}
    modules = dict(module.named_modules())
    if isinstance(module, fx.GraphModule):
        paths |= {n.name for n in module.graph.nodes}
        sites = find_shortcuts(module)
        found = [(s.path, s.module, s) for s in sites]
        inlined = any(s.inlined for s in sites)
    else:
        found = [(name, sub, None) for name, sub in modules.items() if is_shortcut(sub)]
        inlined = False
    gates = []
    for name, sub, site in found:
        src, dst = _layer_names(name, paths)
        ramp = getattr(sub, "ramp", None)
        gates.append(Gate(name=name, source_layer=src, target_layer=dst,
                          init=sub.init.value if sub.init is not None else None,
                          kind=sub.kind, value=sub.openness(site, modules),
                          ramp=None if ramp is None else float(ramp), join=sub.join))
    return GateReport(gates=tuple(gates), flattened=inlined)


def _skip_paths(tensors: dict) -> list[str]:
    """Shortcut paths named by the parameters of a state_dict, in parameter order."""
    return list(dict.fromkeys(m.group("path") for k in tensors if (m := _SKIP_PARAM.match(k))))


def _flat_gate(path: str, tensors: dict, paths: set[str]) -> Gate:
    """A shortcut seen only through its tensors: the init cannot be told."""
    gate, ramp = tensors.get(f"{path}.gate"), tensors.get(f"{path}.ramp")
    kind = "projection" if f"{path}.proj.weight" in tensors else "identity"
    src, dst = _layer_names(path, paths)
    return Gate(name=path, source_layer=src, target_layer=dst,
                init="morph" if ramp is not None else None, kind=kind,
                value=None if gate is None else float(gate.detach().float().item()),
                ramp=None if ramp is None else float(ramp))


def _prefixes(names: Iterable[str]) -> set[str]:
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _layer_names(path: str, candidates: set[str]) -> tuple[str, str]:
    """('features.0', 'features.7') from 'skip_features_0__features_7', where the names exist.

    The rewrite names a shortcut after the layers it joins with every
    non-word character turned into '_'; a candidate name that cleans to the
    same text wins, else the cleaned text is returned as it is.
    """
    leaf = path.rsplit(".", 1)[-1]
    body = leaf.removeprefix("skip_")
    src, sep, dst = body.partition("__")
    if not sep:
        return body, ""
    lookup: dict[str, str] = {}
    for cand in sorted(candidates, key=lambda c: (c.count("_"), c)):
        lookup.setdefault(name_part(cand), cand)
    return lookup.get(src, src), lookup.get(dst, dst)
