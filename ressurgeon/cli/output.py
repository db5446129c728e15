"""Where a command's results and messages go, and the one place errors become exit codes.

A command body runs inside ``with session(as_json=..., quiet=..., debug=...) as out:``.
The session owns the three flags: ``out.step`` shows a spinner on stderr,
``out.note`` a line on stderr (both silent with --quiet or --json),
``out.emit(data, render)`` prints JSON on stdout with --json and calls
``render()`` otherwise, and every exception becomes one line and an exit code.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator

import typer
from rich.console import Console

from ..errors import RessurgeonError, VerificationError, brief

__all__ = ["Output", "console", "err", "session"]

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Output:
    """Where a command's results and messages go: JSON or a table on stdout, notes on stderr."""

    def __init__(self, *, as_json: bool, quiet: bool):
        self.as_json = as_json
        self.quiet = quiet or as_json
        self.silent = quiet   # --quiet; --json alone still lets warnings through

    def warn(self, text: str) -> None:
        """One line on stderr that a result needs (with --json too; not with --quiet)."""
        if not self.silent:
            err.print(text, markup=False, highlight=False)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A spinner on stderr while the block runs."""
        if self.quiet:
            yield
            return
        with err.status(text):
            yield

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False, highlight=False)

    def line(self, text: str) -> None:
        """A plain line of the result on stdout (not with --json)."""
        if not self.as_json:
            console.print(text, markup=False, highlight=False)

    def emit(self, data: dict, render: Callable[[], None] | None = None) -> None:
        """The result: ``data`` as JSON on stdout with --json, else ``render()``."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
        elif render is not None:
            render()

    def table(self, table) -> None:
        if not self.as_json:
            console.print(table)


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    return str(value)


@contextlib.contextmanager
def session(*, as_json: bool = False, quiet: bool = False, debug: bool = False) -> Iterator[Output]:
    """The one place that turns exceptions into a message and an exit code.

    Exit codes: 2 bad input or usage (any ``RessurgeonError``), 3 a requested
    verification failed (``VerificationError``), 130 interrupted, 1 a fault of
    ressurgeon's own (with --debug, the traceback).
    """
    if debug:
        _debug_notes()
    try:
        yield Output(as_json=as_json, quiet=quiet)
    except (typer.Exit, typer.Abort):
        raise
    except RessurgeonError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(3 if isinstance(exc, VerificationError) else 2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"internal error: {type(exc).__name__}: {brief(exc)} (this is a ressurgeon "
                   "bug; run again with --debug and report the traceback)", err=True)
        raise typer.Exit(1) from None


def _debug_notes() -> None:
    """With --debug, the library's debug notes (e.g. guards code not run) go to stderr."""
    import logging

    logger = logging.getLogger("ressurgeon")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


