"""Old import path of ``ressurgeon.capture.exported``, kept for one release (same module object)."""

import sys

from .capture import exported as _module

sys.modules[__name__] = _module
