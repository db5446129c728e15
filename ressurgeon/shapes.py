"""Old import path of ``ressurgeon.capture.shapes``, kept for one release (same module object)."""

import sys

from .capture import shapes as _module

sys.modules[__name__] = _module
