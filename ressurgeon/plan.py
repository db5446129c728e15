"""Old import path of ``ressurgeon.skips.plan``, kept for one release (same module object)."""

import sys

from .skips import plan as _module

sys.modules[__name__] = _module
