"""The ressurgeon command line; each module registers its commands on ``app``.

Import order is the order of ``ressurgeon --help``: the main job first.
"""

from . import surgery  # noqa: F401, I001  (add-skips, inspect)
from . import deploy  # noqa: F401  (export, fold)
from . import diagnose  # noqa: F401  (diagnose, gates)
from .app import app, main

__all__ = ["app", "main"]
