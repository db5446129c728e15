"""The ressurgeon command line; each module registers its commands on ``app``."""

from . import deploy, surgery  # noqa: F401  (register export, fold; add-skips, inspect)
from .app import app, main

__all__ = ["app", "main"]
