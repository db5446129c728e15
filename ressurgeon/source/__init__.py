"""Stage 6, save: a rewritten GraphModule as a Python package that rebuilds it by constructor calls.

``build_package`` makes what ``save_code`` puts in a ``--save-code`` folder:

- ``module.py``: one class whose ``__init__`` calls the constructor of every
  submodule (torch.nn classes with the arguments read back from the module's
  own attributes, ressurgeon's modules with the arguments their
  ``constructor_args()`` gives) and whose ``forward`` is the fx graph's code;
- ``model.safetensors``: the state_dict, each tensor once (tied parameters are
  stored under their first name and tied again on load), loaded with
  ``strict=True`` from the package's own folder;
- ``constants.safetensors`` (when the model has any): the tensors that are no
  part of the state_dict (non-persistent buffers, fx's ``_tensor_constant0``).

Decide, then write: every name that reaches the source (child, parameter and
node names, attribute paths, the functions the graph calls) is checked against
the identifier allowlist of ``_names`` before any source is generated, and
every constructor call is checked by building it (on the meta device) and
comparing it with the module it stands for: same submodules, tensor names and
shapes, plain attributes and repr. A leaf of any other class (a user's or a
third party's) is refused, or, with ``trust_pickle``, stored as a pickle that
``module.py`` loads with ``weights_only=False``, said in a comment there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import fx

from .._io import owned_folder
from ..errors import ExportError
from .calls import DERIVED, SIGNATURES, _Planner
from .graph import check_graph, forward_source
from .render import _Source, _assignment, _walk
from .tensors import _check_storable, _safetensors_bytes, _tensor_files

WEIGHTS = "model.safetensors"
CONSTANTS = "constants.safetensors"


_HEADER = '''"""{name}: written by ressurgeon --save-code.

__init__ builds every submodule by a constructor call (on the meta device: shapes only) and
loads every tensor from {weights} in this folder (strict=True){constants}.
forward is the rewritten graph's code. Importing this package needs torch, safetensors and
ressurgeon (its shortcut modules and the input checks a torch.export capture adds).
"""

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
'''

_LOADER = '''

_HERE = Path(__file__).parent
# tensors the model holds under several names: {{name: the name they are stored under}}
_TIED = {tied}
# parameters that do not train (requires_grad=False)
_FROZEN = {frozen}


def _get(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _set(model, path, value):
    owner, _, name = path.rpartition(".")
    setattr(_get(model, owner) if owner else model, name, value)


def _load_weights(model):
    """Every tensor from this folder: the state_dict (strict), then the constants."""
    state = load_file(_HERE / "{weights}")
    keys = set(model.state_dict())
    state.update({{alias: state[name] for alias, name in _TIED.items() if alias in keys}})
    model.load_state_dict(state, strict=True, assign=True)
{constants_load}    for alias, name in _TIED.items():
        _set(model, alias, _get(model, name))
    for name in _FROZEN:
        _get(model, name).requires_grad_(False)
'''

_CONSTANTS_LOAD = '''    for path, tensor in load_file(_HERE / "{constants}").items():
        _set(model, path, tensor)  # non-persistent buffers and tensor attributes
'''


@dataclass(frozen=True)
class CodePackage:
    """A ``--save-code`` package, checked and made, not yet written.

    ``texts``: module.py and __init__.py; ``tensors``: {file: {name: tensor}}, the
    model's own tensors (serialised only by ``write``); ``pickles``: {file: submodule},
    only with ``trust_pickle``.
    """

    name: str
    texts: dict[str, str]
    tensors: dict[str, dict[str, torch.Tensor]]
    pickles: dict[str, nn.Module]

    @property
    def source(self) -> str:
        """module.py's text."""
        return self.texts["module.py"]

    def write(self, folder: str | Path) -> Path:
        """Write the files into ``folder`` (new, or one ressurgeon wrote: ``_io.owned_folder``)."""
        folder = Path(folder)
        with owned_folder(folder) as tmp:
            for file, text in self.texts.items():
                (tmp / file).write_text(text)
            for file, tensors in self.tensors.items():
                (tmp / file).write_bytes(_safetensors_bytes(tensors))
            for file, child in self.pickles.items():
                buffer = io.BytesIO()  # torch's writer aborts on a full disk; Python's raises
                torch.save(child, buffer)
                (tmp / file).write_bytes(buffer.getbuffer())
        return folder


def build_package(module: fx.GraphModule, *, name: str = "RewrittenModel",
                  trust_pickle: bool = False) -> CodePackage:
    """``module`` as the files of a package: module.py, __init__.py, the weights.

    ``name`` must be checked as an identifier by the caller; every other name is
    checked here before any source is generated.

    Raises:
        UnsafeFileError: a name that is not an identifier (or index path).
        ExportError: a submodule no constructor call rebuilds (without ``trust_pickle``),
            a call or value the source cannot spell, safetensors missing.
    """
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise ExportError("--save-code writes the weights as safetensors: "
                          "pip install 'ressurgeon[safetensors]'") from exc
    check_graph(module)
    planner = _Planner(trust_pickle)
    root = planner.plan("", module, root=True)
    forward, forward_imports, wraps = forward_source(module)
    state, constants, tied, frozen = _tensor_files(module)

    src = _Source({name, "nn", "torch", "Path", "load_file", "OrderedDict", "_HERE", "_TIED",
                   "_FROZEN", "_get", "_set", "_load_weights"})
    src.module(root)
    pickled = []
    for spec in _walk(root):
        if spec.pickle is not None:  # a child only unpickling rebuilds: the user trusted it
            pickled += [f"# --trust-pickle: {spec.pickle} is a pickle; loading it runs code "
                        "it names (weights_only=False)",
                        _assignment(spec.path, f"torch.load(_HERE / {spec.pickle!r}, "
                                    "weights_only=False)")]
    body = ["super().__init__()", 'with torch.device("meta"):  # shapes only: the tensors are '
            f"loaded from {WEIGHTS}"]
    body += [f"    {line}" for line in src.lines] or ["    pass"]
    body += pickled
    body += src.ties
    body.append("_load_weights(self)")
    imports = list(dict.fromkeys(forward_imports + src.imports))
    text = _HEADER.format(name=name, weights=WEIGHTS,
                          constants=f" and {CONSTANTS}" if constants else "")
    text += "".join(f"{line}\n" for line in imports if line != "import torch")
    text += "".join(f"\n{line}" for line in wraps) + ("\n" if wraps else "")
    text += _LOADER.format(tied=_literal(tied), frozen=_literal(tuple(frozen)), weights=WEIGHTS,
                           constants_load=_CONSTANTS_LOAD.format(constants=CONSTANTS)
                           if constants else "")
    text += f"\n\nclass {name}(nn.Module):\n    def __init__(self):\n"
    text += "".join(f"        {line}\n" for line in body)
    text += "\n" + "".join(f"    {line}\n" if line.strip() else "\n"
                           for line in forward.splitlines())
    try:  # a name that is a keyword (an input named ``lambda``) surfaces here, not on import
        compile(text, "module.py", "exec")
    except SyntaxError as exc:
        raise ExportError(f"--save-code: the module.py it would write does not compile "
                          f"({exc.msg}, line {exc.lineno}: {(exc.text or '').strip()[:60]!r}); "
                          "write the model as .pt2") from exc

    init = (f'"""Written by ressurgeon --save-code."""\n\nfrom .module import {name}\n\n'
            f'__all__ = ["{name}"]\n')
    tensors = {WEIGHTS: state, **({CONSTANTS: constants} if constants else {})}
    for stored in tensors.values():
        _check_storable(stored)
    return CodePackage(name, {"module.py": text, "__init__.py": init}, tensors,
                       dict(planner.pickles))


def _literal(value) -> str:
    """A dict or tuple of checked names, one entry a line when long."""
    if not value:
        return "{}" if isinstance(value, dict) else "()"
    if isinstance(value, dict):
        return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in value.items()) + "}"
    return "(\n" + "".join(f"    {v!r},\n" for v in value) + ")"


__all__ = ["CodePackage", "build_package", "check_graph", "forward_source", "SIGNATURES",
           "DERIVED", "WEIGHTS", "CONSTANTS"]
