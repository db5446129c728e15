"""Torch plumbing every stage shares: quiet torch, eval mode, copies of a model.

torch.export.load logs a full traceback before it raises, the exporters print
progress to stdout, and export prints a partial graph to stderr on failure;
ressurgeon reports every such failure itself, as one line.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import gc
import io
import logging
import warnings

import torch
import torch.nn as nn

from .errors import ShapeError

NOISY_LOGGERS = ("torch", "torch.export", "torch._export", "torch._dynamo", "torch.onnx",
                 "torch.fx.experimental.symbolic_shapes", "onnxscript")


@contextlib.contextmanager
def quiet_torch(*, stdout: bool = False, stderr: bool = False):
    """Silence torch's loggers and warnings; also swallow stdout/stderr prints when asked."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            if stdout:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def logged_exceptions(name: str = "torch.export"):
    """Yield a list of the exceptions logger ``name`` reports during the block; nothing is shown.

    torch.export.load logs why it failed (``exc_info``) and then raises a
    generic RuntimeError; this keeps the real cause for the error message.
    Use it inside ``quiet_torch``, which it overrides for this one logger.
    """
    found: list[BaseException] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                found.append(record.exc_info[1])

    logger = logging.getLogger(name)
    saved = logger.level, logger.propagate, logger.handlers
    logger.setLevel(logging.WARNING)
    logger.propagate, logger.handlers = False, [Keep()]
    try:
        yield found
    finally:
        logger.level, logger.propagate, logger.handlers = saved
        logger.setLevel(saved[0])  # also clears the logging module's level cache


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run the block with ``module`` in eval mode; every submodule's own mode is restored after.

    Per submodule, so a training model with frozen (eval-mode) BatchNorm keeps it
    frozen, and a model already in eval mode is not walked twice.
    """
    training = [m for m in module.modules() if m.training]
    if training:
        module.eval()
    try:
        yield module
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (back on after, if it was on).

    A pass builds tens of thousands of small objects (module copies, graph
    nodes, metadata) and frees none of them while it runs; the collector would
    walk them again and again (about a tenth of the pass on a 1,600-node model).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def quiet_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` without the FutureWarning exported graphs' pytree specs raise.

    The same copy as ``copy.deepcopy``, faster on deep models: a module whose
    class copies the default way (no ``__deepcopy__``/``__reduce__`` of its own,
    torch.nn's ``__getstate__``/``__setstate__``) is rebuilt here, its empty hook
    dicts and immutable attributes without the generic machinery; everything
    else (tensors and parameters, non-empty hooks, any other value) goes through
    ``copy.deepcopy`` with the one shared memo, so ties and sharing are kept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _copy(module, {_ALONE: _alone(module)})


_ALONE = "ressurgeon: ids of the plain tensors that share their storage with no other"


def _alone(module: nn.Module) -> set[int]:
    """The module's plain buffers whose storage no other tensor of the module uses.

    Such a buffer is copied by ``clone``; a shared storage goes through
    ``copy.deepcopy``, which keeps the sharing.
    """
    users: dict[tuple, list[torch.Tensor]] = {}
    tensors = (*module.named_parameters(remove_duplicate=False),
               *module.named_buffers(remove_duplicate=False))
    for _, t in tensors:
        if t.device.type in ("cpu", "cuda") and t.layout is torch.strided:
            users.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(t)
        else:
            users.setdefault(("other", id(t)), []).extend((t, t))
    return {id(ts[0]) for ts in users.values()
            if len({id(t) for t in ts}) == 1 and type(ts[0]) is torch.Tensor}


_IMMUTABLE = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device,
                        torch.layout, torch.memory_format})
_DICTS = frozenset({dict, collections.OrderedDict})
_SETS = frozenset({tuple, frozenset, set})


@functools.lru_cache(maxsize=None)
def _plain_copy(cls: type) -> bool:
    """``copy.deepcopy`` copies this class by ``__getstate__``/``__setstate__`` (its own or
    torch.nn's, e.g. Conv's), nothing else: no ``__deepcopy__``, reduce or new-args hook."""
    return (getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
            and not getattr(cls, "__slots__", ()))


def _plain_tensor(t: torch.Tensor) -> bool:
    """A buffer ``clone`` copies as ``copy.deepcopy`` would: a dense leaf with no attributes."""
    return (t.is_leaf and not t.requires_grad and not t.is_quantized and not t.__dict__
            and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _copy(value, memo: dict):
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    known = memo.get(id(value), memo)
    if known is not memo:
        return known
    if kind is torch.Tensor and id(value) in memo[_ALONE] and _plain_tensor(value):
        new = value.detach().clone(memory_format=torch.preserve_format)
        memo[id(value)] = new
        return new
    if kind is nn.Parameter and not value.__dict__:   # Parameter.__deepcopy__, directly
        new = nn.Parameter(value.data.clone(memory_format=torch.preserve_format),
                           value.requires_grad)
        memo[id(value)] = new
        return new
    if isinstance(value, nn.Module) and _plain_copy(kind):
        state = value.__getstate__()
        if type(state) is dict:
            new = kind.__new__(kind)
            memo[id(value)] = new
            for key, item in state.items():
                state[key] = _copy(item, memo)
            new.__setstate__(state)
            return new
    if kind in _DICTS and all(type(k) is str for k in value):  # hooks, _modules, ...
        new = kind()
        memo[id(value)] = new
        for key, item in value.items():
            new[key] = _copy(item, memo)
        return new
    if kind in _SETS and all(type(v) in _IMMUTABLE for v in value):
        return value if kind is not set else set(value)
    return copy.deepcopy(value, memo)


def normalize_inputs(example_inputs) -> tuple:
    """Accept a tensor or a tuple/list of tensors; return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ShapeError("example_inputs must be a non-empty tuple of tensors, "
                         f"got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"example input {i} is a {type(t).__name__}, not a tensor; "
                             "pass tensors only (as for torch.export)")
    return tuple(example_inputs)
