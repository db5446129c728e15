"""Old import path of ``ressurgeon.skips.rewrite``, kept for one release (same module object)."""

import sys

from .skips import rewrite as _module

sys.modules[__name__] = _module
