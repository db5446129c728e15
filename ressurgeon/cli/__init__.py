"""The ressurgeon command line: every command registered here, in the order of the help."""

from .app import app, main
from .deepen import deepen_cmd
from .deploy import export_cmd, fold_cmd
from .diagnose import diagnose_cmd, gates_cmd
from .rewire import rewire_cmd
from .surgery import add_skips_cmd, inspect_cmd

# the main job first, then the rest in pipeline order
app.command("add-skips")(add_skips_cmd)
app.command("inspect")(inspect_cmd)
app.command("export")(export_cmd)
app.command("fold")(fold_cmd)
app.command("deepen")(deepen_cmd)
app.command("rewire")(rewire_cmd)
app.command("diagnose")(diagnose_cmd)
app.command("gates")(gates_cmd)

__all__ = ["app", "main"]
