"""Run torch.export.load on an untrusted archive with every door to running code shut.

``torch.export.load`` reaches a code-running reader from many places, and an
archive chooses which: payloads marked ``use_pickle`` go to
``torch.load(weights_only=False)``, opaque constants to ``pickle.loads``,
TorchBind objects to ``torch._C._pickle_load_obj``, sample inputs that the safe
reader rejects are retried with ``weights_only=False``, an archive the current
reader cannot open (its first member outside a folder, say) falls back to the
pre-2.8 reader whose every ``torch.load`` retries with ``weights_only=False``,
``torch.load`` hands a TorchScript zip to ``torch.jit.load``, a
``data/aotinductor/`` folder makes it dlopen a compiled library, pytree specs
import modules named in the archive, and symbolic shape expressions stored as
text are parsed by ``sympy.sympify``, which calls ``eval``. Scanning member names for these cannot keep up: torch's zip reader
matches names ignoring case, readers disagree on which of two members with one
name they read, and each torch release adds a path.

So ``refuse_code_execution`` does not look at the archive at all. For the
duration of the load it replaces the entry points themselves, where the
capability lives, whichever path leads there:

- ``pickle.load``/``loads``/``Unpickler`` (and their ``_pickle`` and
  pure-Python twins) refuse. A full unpickle in Python is one of these:
  ``torch.load(weights_only=False)`` subclasses ``pickle_module.Unpickler``
  and calls ``pickle_module.load`` at call time, so it fails too.
- ``torch.load`` always runs with ``weights_only=True``: torch's restricted
  unpickler, which rebuilds tensors and plain containers and calls nothing
  outside its allowlist. Archives that need no more (every archive
  ``torch.export.save`` writes from plain tensors, in the current layout or
  the pre-2.8 one that torch 2.5-2.7 wrote) still load; a pickle it rejects
  is recorded as a refusal.
- ``torch.jit.load``, ``torch._C.import_ir_module(_from_buffer)`` and
  ``torch._C._pickle_load_obj`` (TorchScript and TorchBind), the AOTInductor
  package loader, and ``torch.ops``/``torch.classes.load_library`` refuse.
- ``importlib.import_module`` imports only torch's own modules or ones
  already imported, and the enum hook of pytree specs (stored as JSON in the
  archive, with module:attribute names that it imports and subscripts) only
  looks up Enum classes: ``import antigravity`` runs a program, and
  ``ctypes.cdll["lib.so"]`` loads one.
- ``sympy.sympify`` takes a string only if it parses (Python ``ast``) as
  arithmetic, comparisons and calls of known sympy/torch functions over
  symbol names: no attributes, subscripts or lambdas, strings only as the
  name of a ``Symbol`` or the digits of a ``Float``, names that resolve to
  nothing else, so its ``eval`` can reach nothing but sympy arithmetic.

Every refusal is noted in the list the context yields, even one that torch
catches and steps around; the caller refuses the file when the list is not
empty, so the result is "loaded without running anything" or an error.

After the load, ``foreign_callables`` closes the one door that opens later,
when the graph runs: torch's verifier limits what a node calls to operators,
but an argument stored as an operator name is resolved from any ``torch.*``
attribute, and a higher-order op calls what it is given. Every callable a
loaded graph passes must be a torch operator.

Why this fails closed: a new path in torch ends in one of these functions, not
in a new one; the patches are module attributes, and torch's loaders look them
up at call time (``pickle.loads(...)``, ``torch.load(...)``,
``torch._C._pickle_load_obj(...)``), checked for torch 2.13 and 2.14. A caller
holding its own reference from import time would escape the patch, which is
why the pickle functions are shut as well as ``torch.load`` forced: either one
alone stops ``torch.load(weights_only=False)``.

Thread safety: the patches are process-wide. A lock serialises these loads,
and while one runs, other threads that unpickle are refused too (closed, not
open): do not load untrusted archives next to code that needs pickle at the
same moment.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import pickle
import re
import threading
from collections.abc import Iterator

from ..errors import brief

_LOCK = threading.RLock()


class CodeRefused(RuntimeError):
    """An entry point that would run code from the file was called during the load."""


@contextlib.contextmanager
def refuse_code_execution() -> Iterator[list[str]]:
    """Shut every code-running loader for the duration; yields the refusals noted so far."""
    refused: list[str] = []
    with _LOCK:
        saved = []
        try:
            for owner, name, value in _replacements(refused):
                if hasattr(owner, name):
                    # a method of torch.ops lives on its class: restore by deleting ours
                    own = name in getattr(owner, "__dict__", {})
                    saved.append((owner, name, getattr(owner, name) if own else None))
                    setattr(owner, name, value)
            yield refused
        finally:
            for owner, name, value in reversed(saved):
                if value is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)


def _replacements(refused: list[str]) -> list[tuple[object, str, object]]:
    import _pickle
    import enum
    import importlib
    import sys

    import sympy
    import torch
    from torch.utils import _pytree as pytree

    def refuse(what: str):
        def refuser(*args, **kwargs):
            refused.append(what)
            raise CodeRefused(f"refused to load {what}")
        return refuser

    class RefusedUnpickler:  # stands in for pickle.Unpickler, also as a base class
        def __init__(self, *args, **kwargs):
            refused.append("a Python pickle")
            raise CodeRefused("refused to unpickle")

    class RefuseAll:  # stands in for a loader class: any use refuses
        def __init__(self, what: str):
            self.what = what

        def __call__(self, *args, **kwargs):
            return refuse(self.what)()

        def __getattr__(self, name):
            return refuse(self.what)

    load = torch.serialization.load

    def weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None,
                          mmap=None, **kwargs):
        if pickle_module is not None:
            return refuse(f"a pickle through {getattr(pickle_module, '__name__', 'a pickler')}")()
        try:
            return load(f, map_location, weights_only=True, mmap=mmap, **kwargs)
        except pickle.UnpicklingError as exc:  # met what the restricted unpickler refuses
            refused.append(f"a pickle that needs full unpickling ({unpickling_refusal(exc)})")
            raise
        except RuntimeError as exc:
            if "TorchScript" in str(exc):
                refused.append("a TorchScript archive")
            raise

    sympify = sympy.sympify

    def checked_sympify(a, *args, **kwargs):
        if isinstance(a, str):
            names = kwargs.get("locals", args[0] if args else None) or {}
            problem = _expression_problem(a, set(names))
            if problem:
                refused.append(f"a shape expression that is code ({problem})")
                raise CodeRefused(f"refused to evaluate {a[:40]!r}")
        return sympify(a, *args, **kwargs)

    import_module = importlib.import_module

    def torch_or_imported_only(name, package=None):
        resolved = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if resolved in sys.modules or resolved == "torch" or resolved.startswith("torch."):
            return import_module(name, package)
        return refuse(f"an import of {resolved}")()

    enum_hook = pytree.enum_object_hook

    def enums_only(obj):
        if "__enum__" in obj:
            module, _, qualname = str(obj.get("fqn", "")).partition(":")
            target = sys.modules.get(module)
            for attr in qualname.split("."):
                target = getattr(target, attr, None)
            if not (isinstance(target, type) and issubclass(target, enum.Enum)):
                return refuse(f"a tree spec that looks up {obj.get('fqn')!r}")()
        return enum_hook(obj)

    pickler = refuse("a Python pickle")
    table = [(module, name, pickler) for module in (pickle, _pickle)
             for name in ("load", "loads", "_load", "_loads")]
    table += [(module, name, RefusedUnpickler) for module in (pickle, _pickle)
              for name in ("Unpickler", "_Unpickler")]
    table += [
        (torch, "load", weights_only_load),
        (torch.serialization, "load", weights_only_load),
        (torch.jit, "load", refuse("a TorchScript archive")),
        (torch._C, "import_ir_module", refuse("a TorchScript archive")),
        (torch._C, "import_ir_module_from_buffer", refuse("a TorchScript archive")),
        (torch._C, "_pickle_load_obj", refuse("a TorchBind object (a TorchScript pickle)")),
        (torch.ops, "load_library", refuse("a native library")),
        (torch.classes, "load_library", refuse("a native library")),
        (sympy, "sympify", checked_sympify),
        (importlib, "import_module", torch_or_imported_only),
        (pytree, "enum_object_hook", enums_only),
    ]
    aoti = getattr(torch._C, "_aoti", None)
    if aoti is not None:
        table.append((aoti, "AOTIModelPackageLoader", RefuseAll("an AOTInductor compiled library")))
    return table


def foreign_callables(ep) -> list[str]:
    """Callables that a loaded graph passes to its nodes and that are not torch operators.

    torch's verifier limits what a node may call, not what it may pass: an
    argument stored as an operator name is resolved from any ``torch.*``
    attribute (``torch.os.system`` included), and a higher-order op calls the
    callables it is given when the graph runs.
    """
    import torch
    from torch.utils import _pytree as pytree

    operators = (torch.fx.Node, torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                 torch._ops.HigherOrderOperator)
    found = []
    for module in ep.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            for value in pytree.tree_leaves((node.args, node.kwargs)):
                if callable(value) and not isinstance(value, operators):
                    name = getattr(value, "__qualname__", None) or type(value).__name__
                    found.append(f"{getattr(value, '__module__', '?')}.{name}")
    return found


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                "(1)", "(2)", "In PyTorch")


def unpickling_refusal(exc: BaseException) -> str:
    """The line of a weights_only refusal that says what was refused, without torch's advice."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(_BOILERPLATE):
            return brief(ValueError(line.rstrip(".")), 120)
    return brief(exc, 120)


# What a stored shape expression may name besides its symbols and the torch
# functions the deserializer passes in ``locals``: sympy's arithmetic, as
# ``str()`` and ``srepr()`` (which torch writes) spell it. All of these only
# build math objects from their arguments.
SYMPY_NAMES = frozenset({
    "Abs", "Add", "And", "BooleanFalse", "BooleanTrue", "ComplexInfinity", "Eq", "Equality",
    "ExprCondPair", "Float", "Ge", "GreaterThan", "Gt", "Half", "Infinity", "Integer", "Le",
    "LessThan", "Lt", "Max", "Min", "Mod", "Mul", "NaN", "Ne", "NegativeInfinity",
    "NegativeOne", "Not", "One", "Or", "Piecewise", "Pow", "Rational", "StrictGreaterThan",
    "StrictLessThan", "Symbol", "Tuple", "Unequality", "Zero", "ceiling", "false", "floor",
    "nan", "oo", "sqrt", "true", "zoo", "True", "False",
})
# srepr writes Symbol('s0', positive=True, integer=True) and Float('1.5', precision=53):
# the only calls that may take a string (a name or a number) and keywords (assumptions).
_CONSTRUCTORS = {"Symbol": re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
                 "Float": re.compile(r"[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|inf|nan)")}
_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real",
                          "zero", "nonzero", "finite", "infinite", "even", "odd", "rational",
                          "commutative", "precision"})
_EXPRESSION_CHARS = re.compile(r"[A-Za-z0-9_ +\-*/%().,<>=!&|~^']*")
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name,
          ast.Load, ast.Constant, ast.Tuple, ast.keyword, ast.operator, ast.unaryop, ast.boolop,
          ast.cmpop)


def _expression_problem(text: str, local_names: set[str]) -> str | None:
    """Why ``text`` is not plain shape arithmetic (None when it is)."""
    import sympy

    if len(text) > 10_000 or not _EXPRESSION_CHARS.fullmatch(text):
        return "unexpected characters"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return "not an expression"
    spelt: set[int] = set()  # the string constants that name a symbol or spell a number
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            return f"{type(node).__name__} is not arithmetic"
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                return "a call of something other than a function name"
            pattern = _CONSTRUCTORS.get(node.func.id)
            first = node.args[0] if node.args else None
            if (pattern is not None and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and pattern.fullmatch(first.value)):
                spelt.add(id(first))
            for kw in node.keywords:
                if pattern is None or kw.arg not in _ASSUMPTIONS or not (
                        isinstance(kw.value, ast.Constant) and type(kw.value.value) in (bool, int)):
                    return f"keyword {kw.arg}"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and id(node) in spelt:
                continue
            if type(value) not in (int, float, bool) or abs(value) >= 2**63:
                return f"constant {value!r}"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and not (
                isinstance(node.right, ast.Constant) and type(node.right.value) is int
                and abs(node.right.value) <= 64):
            return "a power that is not a small constant"
        elif isinstance(node, ast.Name):
            name = node.id
            known = name in local_names or name in SYMPY_NAMES
            # any other name must become a fresh sympy Symbol: nothing it could resolve to
            fresh = (not name.startswith("_") and not hasattr(builtins, name)
                     and name not in vars(sympy))
            if not (known or fresh):
                return f"name {name}"
    return None
