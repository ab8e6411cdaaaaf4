"""0/1 reward for Countdown: does the final answer combine the given numbers into the target?

The format rule is the reference's: the response must end with ``<think>...</think> <answer>EQ</answer>``.
Unlike the reference (a regex, then Python ``eval``, which lets ``**`` through), the equation is parsed with
:mod:`ast` into a whitelist (non-negative integer literals, ``+ - * /``, unary minus, parentheses) and
computed exactly with :class:`fractions.Fraction`. Length and nesting are capped before any work, so any
input is scored in bounded time and nothing is ever executed.
"""

from __future__ import annotations

import ast
import operator
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction

MAX_EQUATION_CHARS = 256
MAX_DEPTH = 32
TOLERANCE = Fraction(1, 100_000)  # the reference accepts |value - target| < 1e-5

_ALLOWED_CHARS = frozenset("0123456789+-*/() \t\n")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Reject(Exception):
    """The equation is outside the whitelist or cannot be computed."""


def extract_answer(solution_str: str) -> str | None:
    """The equation inside the final ``<answer>`` tags, or None when the response breaks the format rule.

    The stripped response must end with ``</answer>``, and the text before the last ``<answer>`` must end
    with ``</think>`` (whitespace between them allowed) and contain a ``<think>`` before it.
    """
    text = solution_str.rstrip()
    if not text.endswith("</answer>"):
        return None
    open_at = text.rfind("<answer>")
    if open_at < 0:
        return None
    before = text[:open_at].rstrip()
    if not before.endswith("</think>") or "<think>" not in before[: -len("</think>")]:
        return None
    return text[open_at + len("<answer>") : -len("</answer>")]


def _evaluate(node: ast.AST, literals: list[int], depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise _Reject
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise _Reject
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, literals, depth + 1)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, literals, depth + 1)
        right = _evaluate(node.right, literals, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Reject
        return _BINARY[type(node.op)](left, right)
    raise _Reject


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """Exact value of a whitelisted arithmetic expression and the integer literals it uses, or None.

    None for anything outside the whitelist: names, calls, ``**``, ``%``, ``//``, floats, oversized or
    deeply nested input, division by zero, syntax errors.
    """
    if len(equation) > MAX_EQUATION_CHARS or not set(equation) <= _ALLOWED_CHARS:
        return None
    try:
        tree = ast.parse(equation.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    literals: list[int] = []
    try:
        value = _evaluate(tree.body, literals, 0)
    except _Reject:
        return None
    return value, literals


def _parse_ground_truth(ground_truth: Mapping) -> tuple[Fraction, Counter]:
    try:
        target, numbers = ground_truth["target"], ground_truth["numbers"]
        if isinstance(numbers, (str, bytes, Mapping)):
            raise TypeError
        # operator.index accepts numpy integers (verl hands parquet columns over as numpy arrays).
        return Fraction(operator.index(target)), Counter(operator.index(n) for n in numbers)
    except (KeyError, TypeError) as error:
        raise ValueError(
            f'Countdown ground_truth must be {{"target": int, "numbers": [int, ...]}}, got {ground_truth!r}; '
            "prepare the data with experiments/countdown/data_preprocess/countdown.py"
        ) from error


def compute_score(solution_str: str, ground_truth: Mapping) -> float:
    """1.0 if the response's final answer uses each of ``ground_truth["numbers"]`` exactly once and equals
    ``ground_truth["target"]`` (within 1e-5), else 0.0. Never raises on any ``solution_str``."""
    target, numbers = _parse_ground_truth(ground_truth)
    if not isinstance(solution_str, str):
        return 0.0
    equation = extract_answer(solution_str)
    if equation is None:
        return 0.0
    result = evaluate_equation(equation)
    if result is None:
        return 0.0
    value, literals = result
    if Counter(literals) != numbers:
        return 0.0
    return 1.0 if abs(value - target) < TOLERANCE else 0.0
