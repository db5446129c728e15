"""Old import path of ``ressurgeon.load.nn_pickle``, kept for one release (same module object)."""

import sys

from .load import nn_pickle as _module

sys.modules[__name__] = _module
