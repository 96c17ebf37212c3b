"""A calculator that is safe on model text (docs/design.md §5.2): the expression is parsed with `ast` and only number
literals, + - * / // % **, unary signs and parentheses are evaluated, by a walk over the tree; names, calls,
attributes, strings and everything else are refused. Limits keep every answer fast: the expression's length, the
exponent of `**`, and the magnitude of every intermediate result, checked before the operation that would exceed it
(so `9**9**9` is refused without being computed).
"""

from __future__ import annotations

import ast
import math
import operator

from longcat_lab.tools.registry import Tool, ToolError

MAX_CHARS = 200
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e100

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = "numbers, + - * / // % **, unary signs and parentheses"


class CalculatorError(ToolError, ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _check(value: int | float) -> int | float:
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        raise CalculatorError(f"the result {value!r} is not a finite real number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"an intermediate result exceeds the limit of {MAX_MAGNITUDE:g} in magnitude")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent!r} exceeds the limit of {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalculatorError("zero cannot be raised to a negative power")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise CalculatorError(f"{base!r} ** {exponent!r} would exceed the limit of {MAX_MAGNITUDE:g} in magnitude")
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError(f"{base!r} ** {exponent!r} is not a real number")
    return base**exponent


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        return _check(_BINARY[type(node.op)](left, right))
    raise CalculatorError(f"{type(node).__name__} is not allowed: only {_ALLOWED}")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or CalculatorError (a ValueError) saying why not."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression has {len(expression)} characters; the limit is {MAX_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")  # builds a tree; nothing runs
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"not an arithmetic expression: {type(err).__name__}") from None
    try:
        return _eval(tree)
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    except (OverflowError, ZeroDivisionError) as err:
        raise CalculatorError(str(err)) from None


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression with numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "(3 + 4) * 2 / 7" (at most 200 characters)
    """
    return calculate(expression)


CALCULATOR = Tool.from_function(calculator)
