"""The add-skips method, laid out like ``deepen/``: select -> plan -> rewrite, over the shared core.

- ``surgery.py``: ``add_skips``, ``find_spans``, ``inspect_model`` (the driver);
- ``select.py``: the verdict on a pair of ends and the selection of spans;
- ``plan.py``: ``SurgeryPlan`` (a JSON round trip a user can edit);
- ``rewrite.py``: ``apply_plan`` inserts the planned shortcuts.
"""
