"""Old import path of ``ressurgeon.capture.trace``, kept for one release (same module object)."""

import sys

from .capture import trace as _module

sys.modules[__name__] = _module
