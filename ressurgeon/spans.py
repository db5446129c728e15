"""Old import path of ``ressurgeon.skips.select``, kept for one release (same module object)."""

import sys

from .skips import select as _module

sys.modules[__name__] = _module
