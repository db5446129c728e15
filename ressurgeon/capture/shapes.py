"""Shape propagation: run a traced graph once and record every value's shape in node.meta.

Real propagation runs the graph on the example inputs. ``fake=True`` runs it
under torch's FakeTensorMode instead: every op computes only its output's
shape, dtype and device, so a large model costs no activation memory and no
arithmetic. A model built on the ``meta`` device (no weights at all) is
propagated with meta example inputs either way.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn
from torch import fx
from torch.utils import _pytree as pytree

from .._fx import META, NodeInfo, info, node_label, op_name
from .._torch import eval_mode
from ..errors import ShapeError, brief
from ..registry import Trait, op_info


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and writes each value's shape, dtype and device into node.meta."""

    def __init__(self, gm: fx.GraphModule, measure: bool):
        super().__init__(gm)
        self.extra_traceback = False  # our ShapeError already names the node
        self.measure = measure        # max |value| needs real values (not under fake mode)
        self.modules = dict(gm.named_modules())

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ShapeError(_shape_message(self.module, n, self.env, exc)) from exc
        skip = info(n).skip
        if isinstance(result, torch.Tensor):
            n.meta[META] = NodeInfo(shape=tuple(int(d) for d in result.shape),
                                    dtype=result.dtype, device=result.device, skip=skip,
                                    absmax=self._absmax(n, result) if self.measure
                                    else None)
        else:
            # Values that hold no tensor (x.shape, x.size(0), an optional input left at
            # None) carry no activations: the dominator tree ignores them, so
            # ``x.view(x.size(0), -1)`` is no join of branches.
            n.meta[META] = NodeInfo(nodata=not any(isinstance(v, torch.Tensor)
                                                   for v in pytree.tree_leaves(result)),
                                    skip=skip)
        return result


    def _absmax(self, n: fx.Node, result: torch.Tensor) -> float | None:
        """max |result|: the input's when the op only moves values (a view, a permute, an
        eval-mode dropout; ``Trait.REARRANGES`` in the registry), else one pass over it."""
        source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if source is not None:
            op = op_info(n, self.modules)
            moves = n.op == "output" or op is not None and (Trait.REARRANGES in op.traits or (
                Trait.EVAL_NOOP in op.traits and Trait.MODE_DEPENDENT not in op.traits))
            known = source.meta.get(META) if moves else None
            if known is not None and known.absmax is not None and known.dtype == result.dtype:
                return known.absmax
        return _absmax(result)


def _absmax(t: torch.Tensor) -> float | None:
    """max |t| for a real floating-point tensor (nan if any is nan); None otherwise."""
    if not t.is_floating_point() or not t.numel() or t.device.type == "meta":
        return None
    # One pass over the tensor (this runs on every node of every capture): aminmax
    # propagates NaN, and max(-min, max) is max |t| with NaN and infinity kept.
    low, high = torch.aminmax(_in_memory_order(t.detach()))
    return float(torch.maximum(-low, high))


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dims permuted into memory order when that makes it contiguous.

    A reduction over a permuted tensor (channels-last, a transposed view) walks
    memory with strides, several times slower than over the same values in order.
    """
    if t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    inorder = t.permute(order)
    return inorder if inorder.is_contiguous() else t


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, *, fake: bool = False) -> None:
    """Record a NodeInfo (shape, dtype, device) for every node in ``node.meta["ressurgeon"]``.

    Args:
        gm: the graph to annotate (its train/eval mode is restored).
        example_inputs: tuple of tensors.
        fake: propagate FakeTensors (no activation memory, no arithmetic); the
            recorded shapes, dtypes and devices are the same as a real run's.
            Example inputs may then live on the ``meta`` device (no memory at all).

    Raises:
        ShapeError: an op rejected its inputs (names the node and the shapes it got).

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
        >>> propagate_shapes(gm, (torch.randn(3, 4),), fake=True)
        >>> from ressurgeon._fx import shape_of
        >>> [shape_of(n) for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
        [(3, 4), (3, 2)]
    """
    # eval: no running-stat updates; BN accepts batch 1
    with eval_mode(gm), torch.no_grad(), _fake_inputs(example_inputs, fake, gm) as inputs:
        _ShapeRecorder(gm, measure=not fake).run(*inputs)


@contextlib.contextmanager
def _fake_inputs(inputs: tuple, fake: bool, model: nn.Module):
    """Yield the inputs as they are, or as FakeTensors inside a FakeTensorMode.

    A ``meta`` example input becomes a fake tensor on the model's device, so
    even the inputs of a huge model need no memory.
    """
    if not fake:
        yield inputs
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: the model's real parameters and buffers are
    # converted on first use (shape only); they are never copied or written.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = _device_of(model)
    fakes = []
    for t in inputs:
        if t.device.type == "meta" and device.type != "meta":
            with mode:
                t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            fakes.append(t)
        else:
            fakes.append(mode.from_tensor(t))
    with mode:
        yield tuple(fakes)


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def run_error(model: nn.Module, inputs: tuple, *, fake: bool = False) -> Exception | None:
    """Why the untouched model rejects the inputs (None: it accepts them).

    A model that rejects its example inputs has a problem no capture method
    solves: it is the inputs' shape or dtype, and the message should say so.
    """
    copies = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    try:
        with eval_mode(model), torch.no_grad(), _fake_inputs(copies, fake, model) as args:
            model(*args)
        return None
    except Exception as exc:
        return exc


def inputs_message(model: nn.Module, inputs: tuple, exc: Exception) -> str:
    """'Model rejects inputs of shape ...: <why>; <what to pass>' for a model that cannot run."""
    shown = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                      for t in inputs if isinstance(t, torch.Tensor))
    return (f"{type(model).__name__} rejects example inputs {shown}: {brief(exc)}; "
            f"{_input_hint(exc)}{positional_inputs(model, len(inputs))}")


def positional_inputs(model: nn.Module, count: int) -> str:
    """' (Model.forward takes input_ids, attention_mask, ... in that order)': where inputs go.

    Empty when forward takes fewer than two positional inputs (nothing to mix up).
    """
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in kinds]
    except (TypeError, ValueError):
        return ""
    if len(names) < 2:
        return ""
    shown = ", ".join(names[:count + 1]) + (", ..." if len(names) > count + 1 else "")
    return f" ({type(model).__name__}.forward takes {shown} in that order)"


def _input_hint(exc: Exception) -> str:
    text = str(exc)
    if "indices" in text or "scalar type" in text or "Long" in text:
        return ("the model takes integer inputs (token ids): pass the dtype, e.g. "
                "--input-shape 2,8:int64, or integer tensors from Python")
    return "check the example input shape and dtype (--input-shape, e.g. 1,3,224,224)"


def _shape_message(gm: fx.GraphModule, node: fx.Node, env: dict, exc: Exception) -> str:
    shapes = [tuple(env[a].shape) for a in node.all_input_nodes
              if a.op != "get_attr" and isinstance(env.get(a), torch.Tensor)]
    shown = ", ".join(str(tuple(int(d) for d in s)) for s in shapes) or "no tensor"
    if node.op == "call_module":
        what = f"layer '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    else:
        what = f"layer '{node_label(node)}' ({op_name(node, {})})"
    return f"{what} rejected input of shape {shown}: {brief(exc)}; {_input_hint(exc)}"
