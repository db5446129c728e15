"""The ressurgeon command line; each module registers its commands on ``app``."""

from . import deploy, diagnose, surgery  # noqa: F401  (each registers its commands)
from .app import app, main

__all__ = ["app", "main"]
