"""The ressurgeon command line; each module registers its commands on ``app``."""

from . import deploy, diagnose, surgery  # noqa: F401  (each registers its commands)
from .app import app, main

# `ressurgeon --help` lists the main job first, then the rest in pipeline order.
_ORDER = ["add-skips", "inspect", "export", "fold", "diagnose", "gates"]
app.registered_commands.sort(
    key=lambda c: _ORDER.index(c.name) if c.name in _ORDER else len(_ORDER))

__all__ = ["app", "main"]
