"""Old import path of ``ressurgeon.capture.inplace``, kept for one release (same module object)."""

import sys

from .capture import inplace as _module

sys.modules[__name__] = _module
