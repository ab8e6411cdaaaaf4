"""Exhaustive Countdown solver: every value reachable from a multiset of numbers with + - * /.

Every number is used exactly once; intermediate results may be negative or fractional, because the reward
(:mod:`verl_tre.utils.reward_score.countdown`) computes any such equation exactly and accepts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import combinations


def _operand(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


def _combine(left: dict[Fraction, str], right: dict[Fraction, str], into: dict[Fraction, str]) -> None:
    for a, ea in left.items():
        for b, eb in right.items():
            # Expressions are formatted only for new values: most combinations repeat a known value.
            for value, first, symbol, second in (
                (a + b, ea, "+", eb), (a - b, ea, "-", eb), (b - a, eb, "-", ea), (a * b, ea, "*", eb),
                (a / b if b else None, ea, "/", eb), (b / a if a else None, eb, "/", ea),
            ):
                if value is not None and value not in into:
                    into[value] = f"{_operand(first)} {symbol} {_operand(second)}"


def reachable(numbers: Sequence[int]) -> dict[Fraction, str]:
    """Every value an expression using each of ``numbers`` exactly once can take, with one such expression.

    Exhaustive over all binary trees and operators; 4 numbers take about a millisecond.
    """
    if not numbers:
        raise ValueError("need at least one number")
    memo: dict[tuple[int, ...], dict[Fraction, str]] = {}

    def solve(multiset: tuple[int, ...]) -> dict[Fraction, str]:
        if multiset in memo:
            return memo[multiset]
        if len(multiset) == 1:
            result = {Fraction(multiset[0]): str(multiset[0])}
        else:
            result = {}
            rest_positions = range(1, len(multiset))
            seen_splits = set()
            # Position 0 always goes left: the operators cover both orders, so mirrored splits add nothing.
            for size in range(0, len(multiset) - 1):
                for chosen in combinations(rest_positions, size):
                    left = (multiset[0],) + tuple(multiset[i] for i in chosen)
                    right = tuple(multiset[i] for i in rest_positions if i not in chosen)
                    if (left, right) in seen_splits:
                        continue
                    seen_splits.add((left, right))
                    _combine(solve(left), solve(right), result)
        memo[multiset] = result
        return result

    return solve(tuple(sorted(int(n) for n in numbers)))


def solve(numbers: Sequence[int], target: int) -> str | None:
    """One expression using each of ``numbers`` exactly once that equals ``target``, or None if none exists."""
    return reachable(numbers).get(Fraction(target))
