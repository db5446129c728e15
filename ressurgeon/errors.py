"""One error hierarchy for the whole library.

The library raises these and never prints or exits; the CLI alone turns them
into one-line messages and exit codes (``cli/output.py``: 3 for a
VerificationError, 2 for every other RessurgeonError). Errors about a value
the caller passed also derive from ValueError.
"""

from __future__ import annotations

import re


class RessurgeonError(Exception):
    """Base class of every error ressurgeon raises on purpose."""


class ConfigError(RessurgeonError, ValueError):
    """A SkipConfig field or a CLI flag has a value that cannot work."""


class LoadError(RessurgeonError):
    """A model file is missing, unreadable, corrupted or unsafe to load."""


class UnsafeFileError(LoadError):
    """Loading the file would execute code, and the user has not allowed it."""


class TraceError(RessurgeonError):
    """Neither torch.fx nor torch.export could capture the model's graph."""


class ShapeError(RessurgeonError, ValueError):
    """The example inputs do not fit the model (names the node that rejected them)."""


class PlanError(RessurgeonError, ValueError):
    """A surgery plan does not fit the model it is applied to."""


class ExportError(RessurgeonError):
    """The rewritten model could not be written in the requested format."""


class VerificationError(RessurgeonError):
    """A requested check (parity, gradients) failed beyond its tolerance."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def brief(exc: BaseException | None, limit: int = 160) -> str:
    """The first line of an exception's message (colour codes removed), cut to ``limit``."""
    if exc is None:
        return "no error"
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
