"""Capture: a module and example inputs -> a traced GraphModule with shapes in ``node.meta``.

- ``trace.py``: torch.fx first, torch.export as the fallback (``trace_model``);
- ``exported.py``: the one policy for torch.export and ExportedProgram -> trainable GraphModule;
- ``shapes.py``: shape propagation (one pass per tensor for the statistics);
- ``inplace.py``: in-place ops turned off so a shortcut never reads an overwritten tensor.
"""
