"""MATH reward: answer equivalences, last-box extraction, agreement with verl's reference scorer, robustness,
and the math-verify option inside threads with its own timeout."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from verl.utils.reward_score import math as verl_math

from verl_tre.utils.reward_score.math import compute_score, equivalent, last_boxed_answer, normalize


def boxed(answer: str) -> str:
    return f"Some reasoning first. So the answer is $\\boxed{{{answer}}}$."


EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac12"),
    (".5", "\\frac{1}{2}"),
    ("x = 5", "5"),
    ("k=-3", "-3"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$18.90", "18.90"),
    ("50\\%", "50"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("5 \\text{ cm}", "5"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("2\\sqrt3", "2\\sqrt{3}"),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("10\\!000", "10000"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\2\\end{pmatrix}"),
    ("-7/3", "\\frac{-7}{3}"),
]

NOT_EQUIVALENT = [
    ("2", "3"),
    ("0.25", "\\frac{1}{4}"),  # only math-verify sees this one
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("x^2", "x^3"),
    ("12", "1/2"),
    ("abc = 5", "5"),  # prefix longer than two characters is kept
    ("007/3", "\\frac{7}{3}"),  # not a canonical integer: no a/b rewrite
]


@pytest.mark.parametrize(("answer", "reference"), EQUIVALENT)
def test_equivalent_answers_score_one(answer, reference):
    assert equivalent(answer, reference)
    assert compute_score(boxed(answer), reference) == 1.0


@pytest.mark.parametrize(("answer", "reference"), NOT_EQUIVALENT)
def test_different_answers_score_zero(answer, reference):
    assert not equivalent(answer, reference)
    assert compute_score(boxed(answer), reference) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no box here", None),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b}}", "{a}{b}"),
        ("\\boxed{3", None),  # unterminated
        ("\\boxed{1} and a bare \\boxed", None),  # the last box is malformed
        ("\\boxed 42$ and more", "42"),
        ("\\boxed 7", "7"),
        ("\\fbox{9}", "9"),
        ("\\boxed 1$ later \\boxed{2}", "2"),  # the last box wins (the reference would take "1")
        ("\\boxed\\frac{1}{2}", None),
    ],
)
def test_last_boxed_answer(text, expected):
    assert last_boxed_answer(text) == expected


def test_unnormalizable_answers_fall_back_to_raw_equality():
    assert normalize("\\sqrt") is None and normalize("1\\text{ a}\\text{ b}") is None
    assert equivalent("\\sqrt", "\\sqrt") and not equivalent("\\sqrt", "\\sqrt{}")


def test_ground_truth_must_be_text():
    with pytest.raises(TypeError, match="ground_truth"):
        compute_score(boxed("1"), 1)


# Token soup that exercises every normalization rule, so random strings hit them often.
_PIECES = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "$", "\\frac", "\\dfrac", "tfrac", "\\sqrt", "\\left",
           "\\right", "\\text{ ", "^\\circ", "^{\\circ}", "\\%", "\\$", "\\!", "\\\\", "=", "/", ".", " ", "\n",
           "0", "1", "2", "5", "0.5", "-", "x", "ab", "\\pi"]
latexish = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)


def _verl_or_none(function, *args):
    try:
        return function(*args)
    except Exception:  # verl signals "cannot normalize/extract" by raising
        return None


@settings(max_examples=1500, deadline=None)
@given(text=latexish)
def test_normalization_matches_verls(text):
    assert normalize(text) == _verl_or_none(verl_math.strip_string, text)


@settings(max_examples=1000, deadline=None)
@given(text=latexish)
def test_extraction_matches_verls_outside_the_documented_departures(text):
    last = text.rfind("\\boxed")
    assume("\\fbox" not in text)
    assume(not ("\\boxed " in text and not text.startswith("\\boxed ", last)))
    box = verl_math.last_boxed_only_string(text)
    expected = None if box is None else _verl_or_none(verl_math.remove_boxed, box)
    assert last_boxed_answer(text) == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=latexish, reference=latexish, suffix=latexish)
def test_scores_match_verls_reference_scorer(answer, reference, suffix):
    for solution in (f"\\boxed{{{answer}}}{suffix}", f"\\boxed{{{reference}}}", answer + suffix):
        last = solution.rfind("\\boxed")
        if "\\fbox" in solution or ("\\boxed " in solution and not solution.startswith("\\boxed ", last)):
            continue
        assert compute_score(solution, reference) == verl_math.compute_score(solution, reference)


@settings(max_examples=300, deadline=None)
@given(solution=st.text(max_size=3000) | latexish, reference=st.text(max_size=50))
def test_any_text_scores_without_raising_and_fast(solution, reference):
    start = time.perf_counter()
    assert compute_score(solution, reference) in (0.0, 1.0)
    assert time.perf_counter() - start < 0.2  # generous: the machine is shared; typical is well under 1 ms


def test_long_adversarial_response_is_fast():
    response = "\\boxed{" * 20_000 + "\\frac" * 20_000 + "}" * 19_999
    start = time.perf_counter()
    assert compute_score(response, "1") == 0.0
    assert time.perf_counter() - start < 1.0


MATH_VERIFY_ONLY = [("0.25", "\\frac{1}{4}"), ("\\frac{2}{4}", "\\frac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"),
                    ("1+x", "x+1")]


def test_math_verify_accepts_more_inside_a_thread_pool():
    jobs = [(boxed(a), r, 1.0) for a, r in MATH_VERIFY_ONLY] + [(boxed("3"), "4", 0.0), (boxed("x^2"), "x^3", 0.0)]
    jobs = jobs * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(lambda job: compute_score(job[0], job[1], use_math_verify=True), jobs))
    assert scores == [expected for _, _, expected in jobs]
    # Off by default: the reference normalization alone rejects these.
    assert all(compute_score(boxed(a), r) == 0.0 for a, r in MATH_VERIFY_ONLY)


def test_math_verify_timeout_kills_the_comparison_and_recovers():
    compute_score(boxed("1"), "2", use_math_verify=True)  # a started worker, so only the comparison is timed
    # sympy needs several seconds to tell these apart (about 4 s at exponent 12 on one core).
    slow_answer, slow_reference = "(a+b+c+d)^{20}", "(a+b+c+d)^{19}(a+b+c+e)"
    start = time.perf_counter()
    assert compute_score(boxed(slow_answer), slow_reference, use_math_verify=True, math_verify_timeout=0.5) == 0.0
    assert 0.45 < time.perf_counter() - start < 3.0  # the deadline, not a quick answer, ended it
    # The stuck worker was killed; the next call starts a fresh one and gets the right answer again.
    assert compute_score(boxed("0.25"), "\\frac{1}{4}", use_math_verify=True) == 1.0
