"""A calculator that never runs code: `ast` parsing, numbers and arithmetic only, bounded work."""
from __future__ import annotations

import ast
import math
import operator
import time

MAX_EXPRESSION_CHARS = 200  # longer input is refused before parsing
MAX_EXPONENT = 100  # |b| in a ** b
MAX_MAGNITUDE = 1e100  # |value| of every intermediate result
CALCULATOR_TIME_S = 0.5  # wall-clock limit for one evaluation

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_calculate(expression: str, time_limit_s: float = CALCULATOR_TIME_S) -> int | float:
    """The value of an arithmetic expression; ValueError for anything but numbers and + - * / // % ** ( ).

    The text is parsed with `ast` and the tree walked: only number literals, the binary
    operators above and unary + and - are evaluated; every other node (names, calls,
    attributes, subscripts, lambdas, comprehensions, strings, ...) is refused, so no code
    can run. Caps keep the work bounded: at most MAX_EXPRESSION_CHARS characters, exponents
    of at most MAX_EXPONENT in absolute value, intermediate results of at most MAX_MAGNITUDE
    in absolute value, and `time_limit_s` of wall clock.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is {len(expression)} characters long; the limit is {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression: {getattr(e, 'msg', type(e).__name__)}") from None
    deadline = time.perf_counter() + time_limit_s

    def value(node: ast.AST) -> int | float:
        if time.perf_counter() > deadline:
            raise ValueError(f"evaluation took longer than {time_limit_s} s")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and complex excluded
            result = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            result = _UNARY[type(node.op)](value(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large; the limit is {MAX_EXPONENT}")
            try:
                result = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:
                raise ValueError("the result is too large") from None
        else:
            raise ValueError(f"{type(node).__name__} is not allowed: only numbers and + - * / // % ** ( )")
        if isinstance(result, complex):
            raise ValueError("the result is a complex number (a negative number to a fractional power)")
        if abs(result) > MAX_MAGNITUDE or (isinstance(result, float) and math.isnan(result)):
            raise ValueError(f"an intermediate result exceeds {MAX_MAGNITUDE:g} in absolute value")
        return result

    return value(tree.body)
