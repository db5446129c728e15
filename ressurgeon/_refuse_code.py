"""Old import path of ``ressurgeon.load.guard``, kept for one release (same module object)."""

import sys

from .load import guard as _module

sys.modules[__name__] = _module
