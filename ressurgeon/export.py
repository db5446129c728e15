"""Deprecated home of the save stage: use ``ressurgeon.save`` (kept so old imports work)."""

from .save import FORMATS, export_program, save_code, save_model  # noqa: F401
