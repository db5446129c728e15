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
from typer.core import TyperGroup


class _OneLineErrors(TyperGroup):
    """Click's usage errors (unknown option, missing argument, bad value) as one line, exit 2.

    Typer prints them as a usage line, a hint and a boxed message; the rest of the
    CLI says every bad input in one ``error:`` line, so these do too, with the fix.
    Overriding ``main`` covers the console script and typer's CliRunner alike.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import sys

        from typer.core import _click as click  # typer's bundled click

        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            if type(exc).__name__ != "NoArgsIsHelpError":  # typer has printed that help
                typer.echo(f"error: {_usage_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _usage_line(exc) -> str:
    """'No such option: --bogus; see: ressurgeon inspect --help' (one line)."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{message}; see: {ctx.command_path} {ctx.help_option_names[-1]}"


app = typer.Typer(
    name="ressurgeon",
    cls=_OneLineErrors,
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
