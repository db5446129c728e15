"""Recurrent stacks: what the passes need to know of nn.LSTM, nn.GRU and nn.RNN beyond the registry.

The registry makes a recurrent module a weighted layer (features on the last
dim; its sequence output, ``getitem 0`` of the tuple it returns, is the
layer's output), so spans, add and highway joins need nothing more. This
module holds the rest, in one place:

- ``split_recurrent``: a packed multi-layer module (``nn.LSTM(num_layers=k)``)
  becomes a ``RecurrentStack`` of k single-layer modules holding the very same
  parameters, so that shortcuts can go between its layers. It is exact
  (bitwise, on CPU, in eval and, under the same seed, in train mode): layer i's
  ``*_l{i}[_reverse]`` weights become the piece's ``*_l0[_reverse]``, h0/c0 are
  sliced per layer and h_n/c_n concatenated layer-major, and the inter-layer
  dropout is applied to each output but the last, as the fused kernel does.
  ``trace_model`` runs it on its copy of the model (``TraceOptions.split_recurrent``).
- ``widen`` / ``cannot_widen`` / ``narrow``: the concat join's consumer may be a
  single-layer recurrent module: its input weights (``weight_ih_l0``, and
  ``weight_ih_l0_reverse`` when bidirectional) take the new columns.
- ``packed_call``: packed sequences stop torch.fx (and torch.export), so they
  are refused in one line that names the call.
- ``captured_recurrent``: in a graph torch.export captured (a ``.pt2``, the
  export fallback), a recurrent layer is an aten op (``aten.lstm.input``) on a
  flat weight list, fixed to the captured sequence length. The registry makes
  it a layer too, so add and highway shortcuts join it (the graph's input guard
  refuses other lengths, naming this op); concat cannot widen it (no module:
  ``no-consumer``), and a fused multi-layer op stays one layer.

Example:
    >>> lstm = nn.LSTM(8, 8, num_layers=3)
    >>> stack = RecurrentStack.from_packed(lstm).eval()
    >>> x = torch.randn(5, 2, 8)
    >>> torch.equal(stack(x)[0], lstm.eval()(x)[0])
    True
"""

from __future__ import annotations

import math
import re
import traceback

import torch
import torch.nn as nn
from torch import fx
from torch.nn.utils.rnn import PackedSequence

from ._fx import plain_instance
from .config import Init
from .errors import ConfigError, TraceError
from .registry import OpInfo, Trait, register_op

RECURRENT: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
# the aten ops torch.export records for them (a flat weight list, a fixed sequence length)
_CAPTURED = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_PACKING = ("pack_padded_sequence", "pack_sequence", "pad_packed_sequence", "pad_sequence",
            "unpack_sequence", "unpad_sequence")


def layer_major(*states: torch.Tensor) -> torch.Tensor:
    """h_n (or c_n) of a stack: each layer's final states, layer by layer (dim 0).

    torch.fx keeps this call whole, and the registry says it gathers states
    (``Trait.STATES``): it is no merge of branches, so the layers whose states
    it reads stay a plain chain to the layer tree.
    """
    return torch.cat(states)


fx.wrap("layer_major")
register_op(layer_major, OpInfo(traits={Trait.STATES}))


def is_recurrent(module: object) -> bool:
    """A plain nn.LSTM, nn.GRU or nn.RNN (not a subclass with a forward of its own)."""
    return plain_instance(module, RECURRENT)


def _single_layer(module: nn.RNNBase, input_size: int) -> nn.RNNBase:
    """An empty one-layer module like ``module`` reading ``input_size`` features."""
    # built on the meta device: no memory and no draw from the random generator (the
    # caller's seeded stream stays as it was); ``_take`` gives it its real parameters
    kwargs = dict(num_layers=1, bias=module.bias, batch_first=module.batch_first,
                  bidirectional=module.bidirectional, device="meta",
                  dtype=module._flat_weights[0].dtype)
    if isinstance(module, nn.LSTM):
        kwargs["proj_size"] = module.proj_size
    if isinstance(module, nn.RNN):
        kwargs["nonlinearity"] = module.nonlinearity
    return type(module)(input_size, module.hidden_size, **kwargs)


def _take(piece: nn.RNNBase, source: nn.RNNBase, layer: int, widen: int = 0,
          init: Init = Init.PRESERVE) -> None:
    """Give ``piece`` layer ``layer``'s parameters of ``source`` (renamed to ``_l0``).

    With ``widen`` > 0 the input weights get that many more columns: zero for
    preserve, PyTorch's recurrent init (uniform within 1/sqrt(hidden)) otherwise.
    """
    for name in piece._flat_weights_names:
        param = getattr(source, re.sub(r"_l0(?=$|_reverse$)", f"_l{layer}", name))
        if widen and name.startswith("weight_ih"):
            new = torch.zeros(param.shape[0], param.shape[1] + widen, dtype=param.dtype,
                              device=param.device)
            if init is not Init.PRESERVE:
                bound = 1 / math.sqrt(source.hidden_size)
                nn.init.uniform_(new, -bound, bound)
            with torch.no_grad():
                new[:, :param.shape[1]] = param
            param = nn.Parameter(new, requires_grad=param.requires_grad)
        setattr(piece, name, param)
    piece._init_flat_weights()  # the weight list (and its weak refs) now name the real tensors
    piece.train(source.training)


class RecurrentStack(nn.Module):
    """``nn.LSTM/GRU/RNN(num_layers=k)`` as k one-layer modules holding the same parameters.

    ``layers[i]`` holds the fused module's ``*_l{i}[_reverse]`` parameters (the same
    Parameter objects) under the names ``*_l0[_reverse]``; ``drop`` (an
    ``nn.Dropout``, or None when the rate is 0) acts on the output of every layer
    but the last, on ``.data`` of a PackedSequence. ``forward`` takes and returns
    what the fused module does: h0 (and c0) are sliced per layer, h_n (and c_n)
    concatenated layer-major. The fused module's attributes (``num_layers``,
    ``hidden_size``, ``bidirectional``, ``dropout``, ...) and ``flatten_parameters``
    are kept, since models read them in ``forward``.

    Example:
        >>> gru = nn.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        >>> stack = RecurrentStack.from_packed(gru)
        >>> [piece.input_size for piece in stack.layers]
        [4, 12]
    """

    def __init__(self, layers: list[nn.RNNBase], dropout: float = 0.0):
        super().__init__()
        first = layers[0]
        self.layers = nn.ModuleList(layers)
        # the fused module's attributes, which models read (h0 = zeros(lstm.num_layers * 2, ...))
        self.mode, self.input_size = first.mode, first.input_size
        self.hidden_size = first.hidden_size
        self.num_layers, self.bias, self.batch_first = len(layers), first.bias, first.batch_first
        self.bidirectional, self.proj_size = first.bidirectional, getattr(first, "proj_size", 0)
        self.dropout = float(dropout)
        if isinstance(first, nn.RNN):
            self.nonlinearity = first.nonlinearity
        self.directions = 2 if first.bidirectional else 1
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    @classmethod
    def from_packed(cls, module: nn.RNNBase) -> "RecurrentStack":
        """Split a plain multi-layer recurrent module (its parameters are shared, not copied)."""
        width = (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
        pieces = []
        for i in range(module.num_layers):
            piece = _single_layer(module, module.input_size if i == 0 else width)
            _take(piece, module, i)
            pieces.append(piece)
        stack = cls(pieces, module.dropout)
        stack.train(module.training)
        return stack

    def forward(self, input, hx=None):
        lstm = self.mode == "LSTM"
        d = self.directions
        last = len(self.layers) - 1
        out, states = input, []
        for i, layer in enumerate(self.layers):
            state = None
            if hx is not None:
                rows = slice(i * d, (i + 1) * d)
                state = (hx[0][rows], hx[1][rows]) if lstm else hx[rows]
            out, state = layer(out, state)
            states.append(state)
            if self.drop is not None and i < last:
                out = self._drop(out)
        if lstm:
            return out, (layer_major(*[s[0] for s in states]),
                         layer_major(*[s[1] for s in states]))
        return out, layer_major(*states)

    def _drop(self, out):
        if isinstance(out, PackedSequence):
            return out._replace(data=self.drop(out.data))
        return self.drop(out)

    def flatten_parameters(self) -> None:
        """What the fused module's method does, for each layer (models call it in forward)."""
        for layer in self.layers:
            layer.flatten_parameters()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_layers={len(self.layers)}"

    def constructor_args(self) -> tuple[tuple, dict]:
        """What ``save_code`` passes to the constructor to rebuild this module."""
        return (list(self.layers),), {"dropout": self.dropout}


def split_recurrent(model: nn.Module) -> nn.Module:
    """``model`` with every plain multi-layer recurrent module replaced by a RecurrentStack.

    ``model`` is edited in place (``trace_model`` passes its own copy) and
    returned, or the stack itself when ``model`` is one such module. The result
    computes exactly what ``model`` did; only the parameters' names change
    (``lstm.weight_ih_l1`` becomes ``lstm.layers.1.weight_ih_l0``).

    Example:
        >>> net = nn.Sequential(nn.GRU(4, 4, num_layers=2))
        >>> type(split_recurrent(net)[0]).__name__
        'RecurrentStack'
    """
    if is_recurrent(model) and model.num_layers > 1:
        return RecurrentStack.from_packed(model)
    for path, module in list(model.named_modules()):
        if path and is_recurrent(module) and module.num_layers > 1:
            model.set_submodule(path, RecurrentStack.from_packed(module))
    return model


def cannot_widen(module: nn.Module) -> str | None:
    """Why a recurrent consumer cannot take appended input features (None: it can)."""
    if not is_recurrent(module):
        return f"a {type(module).__name__} is not a plain LSTM/GRU/RNN (its forward is its own)"
    if module.num_layers != 1:
        return ("a multi-layer recurrent module takes the features in its first layer only; "
                "trace with split_recurrent on")
    return None


def widen(module: nn.RNNBase, extra: int, init: Init) -> nn.RNNBase:
    """A copy of ``module`` whose ``weight_ih_l0`` (both directions) read ``extra`` more features.

    preserve: the new columns are zero, so the output is exactly unchanged;
    standard: PyTorch's recurrent init. The other parameters are shared.
    """
    why = cannot_widen(module)
    if why:
        raise ConfigError(f"cannot widen {type(module).__name__}: {why}")
    wide = _single_layer(module, module.input_size + extra)
    _take(wide, module, 0, widen=extra, init=init)
    return wide


def narrow(module: nn.Module, width: int) -> nn.Module | None:
    """``module`` reading only its first ``width`` features, if the others' weights are all zero."""
    if cannot_widen(module) is not None or module.input_size <= width:
        return None
    names = [n for n in module._flat_weights_names if n.startswith("weight_ih")]
    if any(bool(getattr(module, n).detach()[:, width:].ne(0).any()) for n in names):
        return None
    piece = _single_layer(module, width)
    _take(piece, module, 0)
    for name in names:
        weight = getattr(module, name)
        setattr(piece, name, nn.Parameter(weight.detach()[:, :width].clone(),
                                          requires_grad=weight.requires_grad))
    piece._init_flat_weights()
    return piece


def packed_call(error: BaseException) -> str | None:
    """The packing function (``pack_padded_sequence``, ...) an fx failure happened in, else None."""
    tb = error.__traceback__
    for frame in reversed(traceback.extract_tb(tb) if tb is not None else []):
        if frame.name in _PACKING and frame.filename.replace("\\", "/").endswith("nn/utils/rnn.py"):
            return f"torch.nn.utils.rnn.{frame.name}"
    if error.__cause__ is not None and error.__cause__ is not error:
        return packed_call(error.__cause__)
    return None


def refuse_packed(model: nn.Module, call: str, where: str) -> TraceError:
    """The one-line error for a model that packs sequences (fx and torch.export both fail there)."""
    at = f" ({where})" if where else ""
    return TraceError(
        f"cannot capture {type(model).__name__}: it calls {call}{at}, whose lengths are data "
        "that torch.fx cannot follow (and torch.export cannot capture); pass padded tensors "
        "to the recurrent layers, or keep the module that packs opaque with --leaf "
        "(leaf_modules), which leaves its layers without shortcuts")


def captured_recurrent(gm: fx.GraphModule) -> fx.Node | None:
    """The first aten recurrent op (``aten.lstm``, ``aten.gru``, ...) in a captured graph."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "aten" \
                and node.target.__name__.split(".")[0] in _CAPTURED:
            return node
    return None
