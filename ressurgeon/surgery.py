"""Old import path of ``ressurgeon.skips.surgery``, kept for one release (same module object)."""

import sys

from .skips import surgery as _module

sys.modules[__name__] = _module
