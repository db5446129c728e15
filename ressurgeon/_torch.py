"""Torch plumbing every stage shares: quiet torch, eval mode, copies of a model.

torch.export.load logs a full traceback before it raises, the exporters print
progress to stdout, and export prints a partial graph to stderr on failure;
ressurgeon reports every such failure itself, as one line.
"""

from __future__ import annotations

import contextlib
import copy
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


def quiet_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` without the FutureWarning exported graphs' pytree specs raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


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
