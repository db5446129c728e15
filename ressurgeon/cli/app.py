"""The command line's root: the typer app, --version, and the console-script entry point.

Exit codes: 0 success; 2 bad input or usage; 3 a verification the user asked
for failed; 1 a fault of ressurgeon's own. Results go to stdout (a table, or
JSON with --json); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import signal
from importlib import metadata
from typing import Annotated

import typer

app = typer.Typer(
    name="ressurgeon",
    help="Add residual (skip) connections to existing PyTorch networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        try:  # the installed torch's version, read without importing torch (seconds)
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "not installed"
        typer.echo(f"ressurgeon {__version__} (torch {torch_version})")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print ressurgeon's and torch's versions and exit.")] = False) -> None:
    """Add residual (skip) connections to existing PyTorch networks.

    Start with `ressurgeon add-skips MODEL.pt2`; every command has --help with examples.
    """


def main() -> None:
    """Console-script entry point."""
    if hasattr(signal, "SIGXFSZ"):
        # past a file-size limit, writes fail with EFBIG (a one-line error, exit 2)
        # instead of the signal killing the process with a core dump
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()
