"""fold, step 4: a shortcut around one linear layer merged into that layer's weights.

``h = conv(x)`` after BatchNorm folding (e.g. ``span=1`` with pre-activation
placement): ``c_h * conv(x) + c_x * P(x)`` is one conv with
``W' = c_h W + c_x E``, E an identity (Dirac) kernel or the 1x1 projection
placed at the tap that reads the same pixel, as RepVGG and DiracNets do.
The kernel algebra depends on exactly what Conv1d/2d/3d and Linear compute,
so only those are merged.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .._fx import call_counts, editable_layer, set_param
from .joins import Join, Outcome, rebind

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def merge_linear(gm: fx.GraphModule, joins: list[Join], modules: dict[str, nn.Module]) -> None:
    """Merge every two-term shortcut whose span is one conv/linear into its weights."""
    calls = call_counts(gm)
    for join in joins:
        if join.terms is None or len(join.terms) != 2:
            continue
        for h, u in (join.terms, join.terms[::-1]):
            layer = editable_layer(h.node, modules, calls, (*CONVS, nn.Linear))
            if (layer is None or h.proj is not None or h.node.args[0] is not u.node
                    or any(user is not join.node for user in h.node.users)):
                continue
            proj = modules.get(u.proj) if u.proj else None
            embedded, why = _embed(layer, proj)
            if embedded is None:
                join.record.reason = why
                continue
            w = layer.weight.double() * h.coef + embedded * u.coef
            set_param(layer, "weight", w, layer.weight)
            if layer.bias is not None:
                set_param(layer, "bias", layer.bias.double() * h.coef, layer.weight)
            join.node.replace_all_uses_with(h.node)
            rebind(joins, join.node, h.node)
            join.terms = []
            join.record.outcome, join.record.reason = Outcome.MERGED, None
            break


def _embed(layer: nn.Module, proj: nn.Module | None) -> tuple[torch.Tensor | None, str | None]:
    """The shortcut as a kernel of ``layer``'s shape (float64), or None and why not."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        if proj is None:
            if w.shape[0] != w.shape[1]:
                return None, "identity around a Linear that changes width"
            return torch.eye(w.shape[0], dtype=torch.float64, device=w.device), None
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            return None, "projection is not a bias-free Linear"
        return proj.weight.double(), None
    k, dims = tuple(w.shape[2:]), w.dim() - 2
    stride, pad, dil = (_tuple(getattr(layer, a), dims) for a in ("stride", "padding", "dilation"))
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return None, f"padding={layer.padding!r}"
    if any(p % d for p, d in zip(pad, dil)) or any(p // d >= kk for p, d, kk in zip(pad, dil, k)):
        return None, "no kernel tap reads the shortcut's pixel (padding vs kernel size)"
    tap = tuple(p // d for p, d in zip(pad, dil))
    out = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    if proj is None:
        if w.shape[0] != layer.in_channels or any(s != 1 for s in stride):
            return None, "identity around a conv that changes channels or stride"
        per_group = w.shape[1]
        for o in range(w.shape[0]):
            out[(o, o % per_group, *tap)] = 1.0
        return out, None
    if (not isinstance(proj, CONVS) or proj.bias is not None or layer.groups != 1
            or proj.groups != 1 or any(p for p in _tuple(proj.padding, dims))
            or _tuple(proj.stride, dims) != stride or tuple(proj.weight.shape[2:]) != (1,) * dims):
        return None, "projection stride/padding/groups do not match the conv"
    out[(slice(None), slice(None), *tap)] = proj.weight.double().reshape(w.shape[:2])
    return out, None


def _tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, str):
        return (0,) * dims
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims
