"""The ressurgeon command line; each module registers its commands on ``app``."""

from . import surgery  # noqa: F401  (registers add-skips, inspect)
from .app import app, main

__all__ = ["app", "main"]
