"""The command line: parse, call the library, render, map errors to exit codes.

Exit codes: 0 success; 2 bad input or usage; 3 a verification the user asked
for failed; 1 a fault of ressurgeon's own. Results go to stdout (a table, or
JSON with --json); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ressurgeon",
    help="Add residual (skip) connections to existing PyTorch networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def main() -> None:
    """Console-script entry point."""
    app()
