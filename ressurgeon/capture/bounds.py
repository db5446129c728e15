"""The sizes a torch.export capture computes, as data: each dim's range and the recorded guards.

A graph torch.export captured is right only for the sizes it was captured for:
each symbolic dim has a range (``ep.range_constraints``: ``Dim(min=, max=)``
plus whatever the model's code implied, such as ``if x.shape[0] > 4``), and
the branches the model took on sizes are recorded as guards
(``ep._guards_code``: strings like ``"(L['x'].size()[2] % 2) == 0"``).
``torch.export.load(...).module()`` checks both by generating Python code
from them; ressurgeon keeps the graph and checks them itself, without running
code from the file:

- ranges come from the sympy ValueRanges torch parsed (``input_ranges``);
- a guard string is parsed with ``ast`` into a small tree of integer
  arithmetic, comparisons and input sizes, and that tree is walked to
  evaluate it (``parse_guard`` / ``check_guards``): nothing is compiled or
  called, and anything else (attribute calls other than ``.size()``, names,
  strings, long or deep expressions) is refused.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re

import torch
from torch import fx

from ..errors import ShapeError

# Bounds on what a guard may be: torch writes short expressions (a few dozen
# characters, a dozen nodes); these leave room for long relations between dims.
MAX_GUARD_CHARS = 2000
MAX_GUARD_NODES = 400

_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
            ast.GtE: ">="}
_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}
_FUNCTIONS = ("min", "max", "abs")


def input_ranges(vals: list, range_constraints: dict | None
                 ) -> list[tuple[tuple[int, int, int | None], ...]]:
    """Per input, (dim, least, most) of its symbolic dims (most None: unbounded).

    Args:
        vals: each placeholder's ``meta["val"]`` (FakeTensors with SymInt sizes).
        range_constraints: ``ep.range_constraints`` (symbol -> ValueRanges), or
            None to read the ranges from the sizes' own ShapeEnv.
    """
    out = []
    for val in vals:
        found = []
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):
                least, most = _size_range(size, range_constraints)
                found.append((d, least, most))
        out.append(tuple(found))
    return out


def _size_range(size: torch.SymInt, range_constraints: dict | None) -> tuple[int, int | None]:
    """The range of one symbolic size: its symbol's, or the bound of its expression."""
    from torch.utils._sympy.value_ranges import bound_sympy

    expr = size.node.expr
    try:
        ranges = (range_constraints if range_constraints is not None
                  else size.node.shape_env.var_to_range)
        found = ranges[expr] if expr in ranges else bound_sympy(expr, dict(ranges))
        least = int(found.lower) if _finite(found.lower) else 0
        # export assumes sizes 0 and 1 behave like 2 (it specialises them when
        # traced) and so records min 2 for an open range; torch's own guards
        # enforce a lower bound above 2 only, and so do these
        least = least if least > 2 else 0
        most = int(found.upper) if _finite(found.upper) else None
    except (AttributeError, KeyError, TypeError, ValueError):
        return 0, None
    return max(least, 0), most


def _finite(value) -> bool:
    # torch's int_oo says is_finite=True to sympy; as a float it is inf
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def placeholder_keys(gm: fx.GraphModule, example_inputs=None) -> list[tuple]:
    """Each placeholder's path in the forward arguments, as a tuple of keys (``('x',)``).

    Guards name an input by that path (``L['x']``, ``L['kwargs']['ids']``). With
    the program's example inputs the paths are those torch.export used; without,
    the placeholder names.
    """
    import inspect

    from torch.utils import _pytree as pytree

    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs:
        try:
            args, kwargs = example_inputs
            bound = inspect.signature(gm.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            paths = [tuple(_key(k) for k in path)
                     for path, _ in pytree.tree_leaves_with_path(bound.arguments)]
            if len(paths) == len(names):
                return paths
        except (TypeError, ValueError):
            pass
    return [(str(name),) for name in names]


def shared_size_guards(vals: list, keys: list[tuple]) -> list[str]:
    """Guards that sizes sharing one symbol are equal (``Dim("batch")`` on two inputs), as text."""
    first: dict = {}
    out = []
    for val, key in zip(vals, keys):
        for d, size in enumerate(getattr(val, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            source = "L" + "".join(f"[{k!r}]" for k in key) + f".size()[{d}]"
            expr = size.node.expr
            if expr in first:
                out.append(f"{source} == {first[expr]}")
            else:
                first[expr] = source
    return out


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def guard_texts(guards: list[str], keys: list[tuple]) -> tuple[str, ...]:
    """The guards, each checked now to parse and to name only these inputs.

    Raises:
        ShapeError: a guard ressurgeon cannot check (names the guard).
    """
    out = []
    for text in guards:
        tree = parse_guard(text)
        for path in _paths(tree):
            if _resolve(path, keys) is None:
                raise ShapeError(f"torch.export recorded the guard {text!r} on an input "
                                 f"({_show_path(path)}) this graph does not take; export the "
                                 "model again with tensors as its inputs")
        out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=256)
def parse_guard(text: str) -> tuple:
    """A guard string as a tree of tuples: ("size", path, dim), ("int", n), (op, a, b), ...

    Raises:
        ShapeError: the text is too long or deep, or is not such an expression.
    """
    if not isinstance(text, str) or len(text) > MAX_GUARD_CHARS:
        raise ShapeError(f"a guard of the captured graph is longer than {MAX_GUARD_CHARS} "
                         "characters; export the model again")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ShapeError(f"cannot read the guard {text[:80]!r} of the captured graph "
                         f"({type(exc).__name__}); export the model again") from exc
    if sum(1 for _ in ast.walk(tree)) > MAX_GUARD_NODES:
        raise ShapeError(f"the guard {text[:80]!r}... of the captured graph is longer than "
                         f"{MAX_GUARD_NODES} terms; export the model again")
    return _convert(tree.body, text)


def _convert(node: ast.AST, text: str) -> tuple:
    def refuse() -> ShapeError:
        return ShapeError(f"the guard {text!r} of the captured graph holds "
                          f"{ast.dump(node)[:60]}, which ressurgeon does not evaluate (it "
                          "checks sizes, integer arithmetic and comparisons only); export the "
                          "model again")

    if isinstance(node, ast.Constant) and type(node.value) in (int, bool):
        return ("int", int(node.value))
    if isinstance(node, ast.BoolOp):
        return ("and" if isinstance(node.op, ast.And) else "or",
                *(_convert(v, text) for v in node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return ("not" if isinstance(node.op, ast.Not) else "neg", _convert(node.operand, text))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return (_BINARY[type(node.op)], _convert(node.left, text), _convert(node.right, text))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        parts = [_convert(node.left, text)] + [_convert(c, text) for c in node.comparators]
        return ("cmp", tuple(_COMPARE[type(op)] for op in node.ops), *parts)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and node.args and not node.keywords):
        return ("call", node.func.id, *(_convert(a, text) for a in node.args))
    # L[...].size()[d]
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "size"
            and not node.value.args and not node.value.keywords
            and isinstance(node.slice, ast.Constant) and type(node.slice.value) is int):
        path = _input_path(node.value.func.value)
        if path is not None:
            return ("size", path, node.slice.value)
    raise refuse()


def _input_path(node: ast.AST) -> tuple | None:
    """``L['x']['k'][0]`` -> ('x', 'k', 0); None for anything else."""
    keys = []
    while isinstance(node, ast.Subscript):
        if not (isinstance(node.slice, ast.Constant) and type(node.slice.value) in (int, str)):
            return None
        keys.append(node.slice.value)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "L") or not keys:
        return None
    return tuple(reversed(keys))


def _paths(tree: tuple):
    if tree[0] == "size":
        yield tree[1]
        return
    for part in tree[1:]:
        if isinstance(part, tuple) and part and isinstance(part[0], str):
            yield from _paths(part)


def _resolve(path: tuple, keys: list[tuple]) -> int | None:
    """The placeholder a guard's input path names (torch also writes ``L['flat_args'][i]``)."""
    if len(path) == 2 and path[0] == "flat_args" and isinstance(path[1], int):
        return path[1] if path[1] < len(keys) else None
    for i, key in enumerate(keys):
        if key == path:
            return i
    return None


def _show_path(path: tuple) -> str:
    return str(path[0]) + "".join(f"[{k!r}]" for k in path[1:])


def _evaluate(tree: tuple, sizes: dict[tuple, int]) -> int:
    op = tree[0]
    if op == "int":
        return tree[1]
    if op == "size":
        return sizes[(tree[1], tree[2])]
    if op == "and":
        return int(all(_evaluate(t, sizes) for t in tree[1:]))
    if op == "or":
        return int(any(_evaluate(t, sizes) for t in tree[1:]))
    if op == "not":
        return int(not _evaluate(tree[1], sizes))
    if op == "neg":
        return -_evaluate(tree[1], sizes)
    if op == "cmp":
        values = [_evaluate(t, sizes) for t in tree[2:]]
        checks = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
                  ">": operator.gt, ">=": operator.ge}  # sizes are SymInts under export
        return int(all(checks[o](a, b) for o, a, b in zip(tree[1], values, values[1:])))
    if op == "call":
        values = [_evaluate(t, sizes) for t in tree[2:]]
        return {"min": min, "max": max, "abs": lambda v: abs(v)}[tree[1]](*values)
    a, b = _evaluate(tree[1], sizes), _evaluate(tree[2], sizes)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:  # sympy's FloorDiv and Mod by a size that is 0: no branch depends on that
        return 0
    return a // b if op == "//" else a % b


@torch.fx.node.has_side_effect  # returns nothing: dead-code passes must keep it
@torch.fx.wrap
def check_guards(inputs: tuple, keys: tuple, guards: tuple[str, ...]) -> None:
    """Raise ShapeError when the inputs' sizes break a guard torch.export recorded.

    Args:
        inputs: the graph's inputs, in placeholder order.
        keys: each input's path in the forward arguments (``placeholder_keys``).
        guards: the guard strings (``ep._guards_code``), parsed by ``parse_guard``.
    """
    keys = [tuple(k) for k in keys]
    for text in guards:
        tree = parse_guard(text)
        sizes, shown = {}, []
        for path in dict.fromkeys(_paths(tree)):
            index = _resolve(path, keys)
            x = inputs[index] if index is not None and index < len(inputs) else None
            if not isinstance(x, torch.Tensor):
                break
            for d in range(x.dim()):
                sizes[(path, d)] = x.shape[d]
            shown.append(f"{_show_path(path)} of shape {tuple(x.shape)}")
        else:
            try:
                ok = _evaluate(tree, sizes)
            except KeyError as exc:  # a dim the input does not have: its rank is checked apart
                raise ShapeError(f"input {', '.join(shown)} lacks the dim that the guard "
                                 f"{_readable(text)} reads; give inputs of the captured "
                                 "rank") from exc
            if not ok:
                raise ShapeError(
                    f"{', '.join(shown)}: torch.export captured this graph for sizes where "
                    f"{_readable(text)} only; give such "
                    "sizes, or capture the model again with an example of the sizes you need")


def _readable(text: str) -> str:
    """``L['x'].size()[2]`` -> ``x.shape[2]`` in messages."""
    return re.sub(r"L\['([^']+)'\]((?:\[[^\]]+\])*)\.size\(\)\[(\d+)\]", r"\1\2.shape[\3]",
                  text.strip())


__all__ = ["input_ranges", "placeholder_keys", "shared_size_guards", "guard_texts",
           "parse_guard", "check_guards"]
