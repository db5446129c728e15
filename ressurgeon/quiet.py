"""Keep torch's own noise away from users: loggers, warnings and stray prints.

torch.export.load logs a full traceback before it raises, the exporters print
progress to stdout, and export prints a partial graph to stderr on failure;
ressurgeon reports every such failure itself, as one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

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
