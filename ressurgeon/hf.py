"""Old import path of ``ressurgeon.load.hf``, kept for one release (same module object)."""

import sys

from .load import hf as _module

sys.modules[__name__] = _module
