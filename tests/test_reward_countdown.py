"""Countdown reward and generator: generated solutions score 1, adversarial equations score 0, any input is
scored quickly without raising, and the solver matches a brute-force enumeration."""

import itertools
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tre.data import generate_countdown, reachable, solve
from verl_tre.utils.reward_score.countdown import (
    MAX_DEPTH,
    compute_score,
    evaluate_equation,
    extract_answer,
)


def respond(equation: str) -> str:
    return f"<think>Let me try a few combinations.</think> <answer>{equation}</answer>"


def test_generated_solutions_always_score_one():
    instances = generate_countdown(300, seed=7, progress=False)
    assert len({(tuple(sorted(x.numbers)), x.target) for x in instances}) == 300
    for x in instances:
        assert len(x.numbers) in (3, 4)
        assert all(1 <= n <= 100 for n in x.numbers) and 1 <= x.target <= 100
        assert compute_score(respond(x.solution), {"target": x.target, "numbers": list(x.numbers)}) == 1.0
    assert Counter(len(x.numbers) for x in instances).keys() == {3, 4}


def test_generator_is_deterministic_per_seed():
    assert generate_countdown(40, seed=1, progress=False) == generate_countdown(40, seed=1, progress=False)
    assert generate_countdown(40, seed=1, progress=False) != generate_countdown(40, seed=2, progress=False)


def test_generator_reports_exhausted_ranges():
    with pytest.raises(ValueError, match="distinct solvable instances"):
        generate_countdown(50, num_numbers=(2,), min_number=1, max_number=2, max_target=4, progress=False)
    with pytest.raises(ValueError, match="min_number"):
        generate_countdown(5, min_number=10, max_number=1, progress=False)


def _brute_force_values(numbers):
    """All values of all operator trees over all orderings, written independently of the solver."""

    def trees(seq):
        if len(seq) == 1:
            yield Fraction(seq[0])
            return
        for cut in range(1, len(seq)):
            for left in trees(seq[:cut]):
                for right in trees(seq[cut:]):
                    yield left + right
                    yield left - right
                    yield left * right
                    if right:
                        yield left / right

    return {v for order in set(itertools.permutations(numbers)) for v in trees(order)}


@pytest.mark.parametrize("numbers", [(1, 2, 3), (5, 5, 5), (3, 3, 8, 8), (1, 7, 13, 100), (0, 4, 9)])
def test_solver_matches_brute_force(numbers):
    values = reachable(numbers)
    assert set(values) == _brute_force_values(numbers)
    for value, expression in values.items():
        evaluated = evaluate_equation(expression)
        assert evaluated is not None and evaluated[0] == value and Counter(evaluated[1]) == Counter(numbers)


def test_solve():
    assert solve([3, 3, 8, 8], 24) is not None
    assert solve([1, 1, 1], 10) is None


GT = {"target": 24, "numbers": [2, 3, 4]}

CORRECT = [
    "2 * 3 * 4",
    "(2 * 3) * 4",
    " 4*(3*2) ",
    "((2))*((3))*((4))",
    "3 * (2 * 4)",
    "-(-2) * 3 * 4",  # unary minus is arithmetic the reference accepts too
]

ADVERSARIAL = [
    "2 ** 3 * 3",  # power: the reference's eval lets it through
    "2 * 3 * 4 ** 1",
    "__import__('os').system('true')",
    "abs(-24)",
    "x",
    "24",  # target literal instead of the numbers
    "2 * 3 * 4 * 1",  # an extra number
    "2 * 12",  # a number not given
    "2 * 3",  # a number missing
    "2 * 3 * 4.0",  # float literal
    "2 * 3 * 4e0",
    "0x18 - 2 + 2 - 3 + 3 - 4 + 4",
    "2_4",
    "(2 * 3 * 4) // 1",
    "2 * 3 * 4 % 25",
    "2 * 3 * (4 / 0)",
    "2 * 3 * 4; import os",
    "[2, 3, 4]",
    "lambda: 2 * 3 * 4",
    "２ * 3 * 4",  # full-width digit
    "(" * 150 + "2 * 3 * 4" + ")" * 150,  # nesting beyond the parser and our cap
    "-" * (MAX_DEPTH + 2) + "2 * 3 * 4",  # unary chain deeper than the cap
    "9" * 300,  # oversized literal
    "2 * 3 * 4" + " " * 300,  # oversized input
    "",
    "2 3 4",
]


@pytest.mark.parametrize("equation", CORRECT)
def test_correct_answers_score_one(equation):
    assert compute_score(respond(equation), GT) == 1.0


@pytest.mark.parametrize("equation", ADVERSARIAL)
def test_adversarial_equations_score_zero(equation):
    assert compute_score(respond(equation), GT) == 0.0


def test_exact_fractions():
    gt = {"target": 24, "numbers": [3, 3, 8, 8]}
    assert compute_score(respond("8 / (3 - 8 / 3)"), gt) == 1.0
    assert compute_score(respond("8 / (3 - 8 / 3) + 1 - 1"), {"target": 24, "numbers": [3, 3, 8, 8, 1, 1]}) == 1.0
    assert compute_score(respond("1 / 3"), {"target": 0, "numbers": [1, 3]}) == 0.0


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>a</think> <answer>2*3*4</answer>", True),
        ("<think>a</think>\n\n<answer>2*3*4</answer>\n", True),
        ("preamble <think>a</think><answer>2*3*4</answer>", True),
        ("<answer>2*3*4</answer>", False),  # no reasoning block
        ("<think>a</think> <answer>2*3*4</answer> trailing text", False),
        ("<think>a</think> words <answer>2*3*4</answer>", False),
        ("</think> <answer>2*3*4</answer>", False),
        ("<think>a</think> <answer>1</answer> <answer>2*3*4</answer>", False),
        ("<think>a</think> <answer>2*3*4", False),
    ],
)
def test_format_rule(response, ok):
    assert (compute_score(response, GT) == 1.0) is ok
    assert (extract_answer(response) is not None) is ok


def test_ground_truth_from_parquet_types_and_bad_ground_truth():
    assert compute_score(respond("2*3*4"), {"target": np.int64(24), "numbers": np.array([4, 3, 2])}) == 1.0
    for bad in [None, {"target": 24}, {"target": "24", "numbers": [2, 3, 4]}, {"target": 24, "numbers": "234"}]:
        with pytest.raises(ValueError, match="ground_truth"):
            compute_score(respond("2*3*4"), bad)


# Random well-formed expression trees, rendered with random spacing, against their own exact value.
leaves = st.integers(0, 120).map(lambda n: (str(n), Fraction(n)))


def _combine(draw_op, left, right):
    op = draw_op
    (ls, lv), (rs, rv) = left, right
    if op == "/" and rv == 0:
        op = "+"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    return f"({ls} {op} {rs})", value


trees = st.recursive(
    leaves,
    lambda children: st.builds(_combine, st.sampled_from("+-*/"), children, children),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(tree=trees)
def test_evaluator_matches_tree_value(tree):
    text, value = tree
    result = evaluate_equation(text)
    assert result is not None and result[0] == value


equationish = st.text(alphabet="0123456789+-*/() .e_x<>ainswerthk", max_size=60)


@settings(max_examples=500, deadline=None)
@given(body=st.text(max_size=2000) | equationish)
def test_any_text_scores_without_raising_and_fast(body):
    for response in (body, respond(body), f"<think>{body}</think><answer>{body}</answer>"):
        start = time.perf_counter()
        assert compute_score(response, GT) in (0.0, 1.0)
        assert time.perf_counter() - start < 0.2  # generous: the machine is shared; typical is well under 1 ms
