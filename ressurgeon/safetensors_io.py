"""Old import path of ``ressurgeon.load.safetensors``, kept for one release (same module object)."""

import sys

from .load import safetensors as _module

sys.modules[__name__] = _module
