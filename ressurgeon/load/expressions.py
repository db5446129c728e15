"""Guards and symbolic shape expressions, parsed (Python ``ast``) and bounded, never evaluated."""

from __future__ import annotations

import ast
import builtins
import re

from .._names import is_identifier, shown
from .allowlist import MAX_EXPONENT, MAX_EXPR_BITS, MAX_EXPR_CHARS, MAX_EXPR_NODES


# -- guards --------------------------------------------------------------------------------

def _parsed(text: object) -> ast.Expression | str:
    """``text`` parsed (never evaluated) when it is a string of bounded length, else why not."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return f"a string of at most {MAX_EXPR_CHARS} characters"
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"


def guard_problem(text: object) -> str | None:
    """Why ``text`` is not a guard as torch writes them (``L['x'].size()[0] <= 64``), or None.

    Guards are never run for an untrusted file (``drop_guards_code``); this
    check only refuses an archive whose guards are something else, and lets
    the checks on capture bounds read them as data. An input reference
    ``L['name']`` followed by ``.size()[i]``, ``.stride()[i]`` or
    ``.storage_offset()`` stands for a size symbol; the rest is shape arithmetic.
    """
    tree = _parsed(text)
    if isinstance(tree, str):
        return tree
    try:
        tree = _InputRefs().visit(tree)
    except _NotArithmetic as exc:
        return str(exc)
    return expression_problem(ast.unparse(tree))


class _InputRefs(ast.NodeTransformer):
    """``L['x'].size()[0]`` (and stride, storage_offset, numel, dim) -> a symbol name."""

    _METHODS = frozenset({"size", "stride", "storage_offset", "numel", "dim"})

    def visit_Subscript(self, node):
        base = node
        while isinstance(base, (ast.Subscript, ast.Call, ast.Attribute)):
            if isinstance(base, ast.Subscript):
                if not (isinstance(base.slice, ast.Constant)
                        and type(base.slice.value) in (int, str)
                        and (type(base.slice.value) is int or is_identifier(base.slice.value))):
                    raise _NotArithmetic("an index that is not a name or a number")
                base = base.value
            elif isinstance(base, ast.Call):
                if base.args or base.keywords or not (
                        isinstance(base.func, ast.Attribute) and base.func.attr in self._METHODS):
                    raise _NotArithmetic("a call other than size(), stride() or numel()")
                base = base.func.value
            else:
                raise _NotArithmetic(f"attribute {base.attr}")
        if not (isinstance(base, ast.Name) and base.id == "L"):
            raise _NotArithmetic("a subscript of something other than an input")
        return ast.copy_location(ast.Name(id="s_input", ctx=ast.Load()), node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute):  # L['x'].numel() without a subscript after it
            return self.visit_Subscript(node)
        return self.generic_visit(node)

    def visit_Attribute(self, node):
        raise _NotArithmetic(f"attribute {node.attr}")


# -- symbolic shape expressions --------------------------------------------------------------

# The functions torch's deserializer gives sympy (torch.utils._sympy.functions) and the
# sympy classes its srepr() writes. All of them build math objects from their arguments.
EXPRESSION_FUNCTIONS = frozenset({
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Add", "Mul",
    "Pow", "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "Equality", "Unequality", "GreaterThan",
    "StrictGreaterThan", "LessThan", "StrictLessThan", "And", "Or", "Not", "Piecewise",
    "ExprCondPair", "Tuple", "Symbol", "Integer", "Float", "Rational", "ceiling", "floor",
    "sqrt", "IntInfinity", "NegativeIntInfinity", "Infinity", "NegativeInfinity", "NaN",
    "Zero", "One", "NegativeOne", "Half", "BooleanTrue", "BooleanFalse", "ComplexInfinity",
    "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
})
EXPRESSION_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "true", "false", "True",
                                  "False", "S"})
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_PRODUCTS = frozenset({"Mul"})
_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real",
                          "zero", "nonzero", "finite", "infinite", "even", "odd", "rational",
                          "commutative", "precision"})
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call,
               ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.keyword, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop)
_FLOAT_TEXT = re.compile(
    r"[-+]?(?:[0-9]{1,400}(?:\.[0-9]{0,400})?(?:[eE][-+]?[0-9]{1,6})?|inf|nan)")


def parse_expression(text: str) -> ast.Expression:
    """A symbolic shape expression as a checked Python ``ast`` (never evaluated).

    Raises:
        ValueError: why ``text`` is not bounded shape arithmetic.
    """
    problem = expression_problem(text)
    if problem:
        raise ValueError(problem)
    return ast.parse(text, mode="eval")


def expression_problem(text: object) -> str | None:
    """Why ``text`` is not bounded shape arithmetic, or None when it is.

    Accepted: integers, symbols, ``+ - * / // % **``, comparisons and the
    functions torch's shape algebra uses, in ``str()`` or ``srepr()`` spelling.
    Bounded: the text's length, its node count, each exponent (a constant of
    at most ``MAX_EXPONENT``) and the bits of the largest number it can make,
    estimated bottom-up, so sympy's arithmetic on it ends quickly.
    """
    tree = _parsed(text)
    if isinstance(tree, str):
        return tree
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_EXPR_NODES:
        return f"more than {MAX_EXPR_NODES} terms"
    for node in nodes:
        if not isinstance(node, _EXPR_NODES):
            return f"{type(node).__name__} is not arithmetic"
    try:
        bits = _bits(tree.body, 0)
    except _NotArithmetic as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    if bits > MAX_EXPR_BITS:
        return f"numbers of up to {bits} bits, more than {MAX_EXPR_BITS}"
    return None


class _NotArithmetic(Exception):
    pass


_SYMBOL_BITS = 64  # a size symbol's value is below 2**63


def _bits(node: ast.AST, depth: int) -> int:
    """An upper bound on the bits of the number ``node`` can make; raises on anything else."""
    if depth > 200:
        raise _NotArithmetic("nested too deeply")
    if isinstance(node, ast.Constant):
        value = node.value
        if type(value) is bool:
            return 1
        if type(value) is int:
            if value.bit_length() > 128:
                raise _NotArithmetic(f"an integer of {value.bit_length()} bits")
            return max(value.bit_length(), 1)
        if type(value) is float:
            return 64
        raise _NotArithmetic(f"constant {shown(value)}")
    if isinstance(node, ast.Name):
        if node.id in EXPRESSION_FUNCTIONS or node.id in EXPRESSION_CONSTANTS or (
                is_identifier(node.id) and not node.id.startswith("_")
                and not hasattr(builtins, node.id)):  # a fresh symbol: resolves to nothing
            return _SYMBOL_BITS
        raise _NotArithmetic(f"name {shown(node.id)}")
    if isinstance(node, ast.UnaryOp):
        return _bits(node.operand, depth + 1)
    if isinstance(node, (ast.BoolOp, ast.Compare, ast.Tuple)):
        parts = (node.values if isinstance(node, ast.BoolOp) else
                 [node.left, *node.comparators] if isinstance(node, ast.Compare) else node.elts)
        return max((_bits(p, depth + 1) for p in parts), default=1)
    if isinstance(node, ast.BinOp):
        left = _bits(node.left, depth + 1)
        if isinstance(node.op, ast.Pow):
            return left * _exponent(node.right)
        if isinstance(node.op, (ast.LShift,)):
            return left + _exponent(node.right)
        right = _bits(node.right, depth + 1)
        if isinstance(node.op, ast.Mult):
            return left + right
        return max(left, right) + 1
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in EXPRESSION_FUNCTIONS:
            raise _NotArithmetic(f"a call of {shown(ast.unparse(node.func))}")
        name = node.func.id
        if name in ("Symbol", "Float", "Integer", "Rational"):
            return _literal(node)
        if node.keywords:
            raise _NotArithmetic(f"keyword {node.keywords[0].arg} of {name}")
        if name in _POWERS:
            if len(node.args) != 2:
                raise _NotArithmetic(f"{name} of {len(node.args)} arguments")
            return _bits(node.args[0], depth + 1) * _exponent(node.args[1])
        if name == "LShift" and len(node.args) == 2:
            return _bits(node.args[0], depth + 1) + _exponent(node.args[1])
        parts = [_bits(a, depth + 1) for a in node.args]
        if name in _PRODUCTS:
            return sum(parts) or 1
        return max(parts, default=1) + 1
    raise _NotArithmetic(f"{type(node).__name__} is not arithmetic")


def _exponent(node: ast.AST) -> int:
    """A power's exponent: an integer constant of at most MAX_EXPONENT, or a simple fraction."""
    value = None
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int:
        value = -node.operand.value
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        args = node.args
        ints = [a.value if isinstance(a, ast.Constant) and type(a.value) is int else
                -a.operand.value if isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub)
                and isinstance(a.operand, ast.Constant) and type(a.operand.value) is int
                else None for a in args]
        if node.func.id == "Integer" and len(ints) == 1 and ints[0] is not None:
            value = ints[0]
        elif node.func.id == "Rational" and len(ints) == 2 and None not in ints and ints[1]:
            value = max(1, -(-abs(ints[0]) // abs(ints[1])))
        elif node.func.id in ("Half", "NegativeOne", "One", "Zero") and not args:
            value = 1
    elif isinstance(node, ast.Name) and node.id in ("Half", "S"):
        value = 1
    if value is None or abs(value) > MAX_EXPONENT:
        raise _NotArithmetic(f"an exponent that is not an integer of at most {MAX_EXPONENT}")
    return max(abs(value), 1)


def _literal(node: ast.Call) -> int:
    """Symbol('s0', positive=True), Integer(3), Float('1.5', precision=53), Rational(1, 2)."""
    name, args = node.func.id, node.args
    for kw in node.keywords:
        if name not in ("Symbol", "Float") or kw.arg not in _ASSUMPTIONS or not (
                isinstance(kw.value, ast.Constant) and type(kw.value.value) in (bool, int)):
            raise _NotArithmetic(f"keyword {kw.arg} of {name}")
    if name == "Symbol":
        if len(args) == 1 and isinstance(args[0], ast.Constant) and is_identifier(args[0].value):
            return _SYMBOL_BITS
        raise _NotArithmetic("a Symbol whose name is not an identifier")
    if name == "Float":
        if len(args) == 1 and isinstance(args[0], ast.Constant) and (
                type(args[0].value) in (int, float) or isinstance(args[0].value, str)
                and _FLOAT_TEXT.fullmatch(args[0].value)):
            return 64
        raise _NotArithmetic("a Float that is not a number")
    if len(args) not in (1, 2) or not all(
            isinstance(a, ast.Constant) and type(a.value) is int or isinstance(a, ast.UnaryOp)
            and isinstance(a.operand, ast.Constant) and type(a.operand.value) is int
            for a in args):
        raise _NotArithmetic(f"{name} of something other than integers")
    return max(_bits(a, 0) for a in args)

