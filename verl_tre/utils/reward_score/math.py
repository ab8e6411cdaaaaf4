"""0/1 reward for MATH-style answers: the last ``\\boxed{...}`` of a response against a reference answer.

The default comparison is the Hendrycks MATH string normalization that verl's MATH reward (and so the TRE
paper's numbers) uses; :func:`normalize` reproduces it rule for rule, including the inputs it gives up on
(then the raw strings are compared). Two deliberate departures in answer extraction, both in cases the
reference scores 0 by accident: ``\\fbox{...}`` counts like ``\\boxed{...}``, and the *last* box wins even
when an earlier one is written ``\\boxed 5``. ``use_math_verify=True`` additionally asks math-verify (in a
watchdog process with a timeout, see :mod:`.math_verify_worker`) when the strings differ.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# Removed verbatim, in this order (the order matters: "\\\\" must collapse before "\\left" is searched).
_DELETIONS_BEFORE_UNITS = ("\n", "\\!")
_DELETIONS_AFTER_FRAC = ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$")

_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")


class _GiveUp(Exception):
    """The reference normalization has no answer for this string; compare it unnormalized."""


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (braces balanced) or ``\\boxed x`` (up to ``$``).

    Returns None when the text has no box or the last one is unterminated or malformed.
    """
    start, command = max(((text.rfind(c), c) for c in _BOX_COMMANDS), key=lambda found: found[0])
    if start < 0:
        return None
    body = start + len(command)
    if command == "\\boxed" and text.startswith(" ", body):
        return text[body + 1 :].split("$", 1)[0]
    if not text.startswith("{", body):
        return None
    depth = 0
    for pos in range(body, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[body + 1 : pos]
    return None


def _drop_right_units(s: str) -> str:
    # In MATH "\text{ " (with the space) only ever introduces a unit after the value.
    parts = s.split("\\text{ ")
    if len(parts) > 2:
        raise _GiveUp
    return parts[0]


def _brace_sqrt(s: str) -> str:
    head, *tails = s.split("\\sqrt")
    out = [head]
    for tail in tails:
        if not tail:
            raise _GiveUp
        out.append("\\sqrt" + (tail if tail[0] == "{" else "{" + tail[0] + "}" + tail[1:]))
    return "".join(out)


def _brace_fracs(s: str) -> str:
    head, *tails = s.split("\\frac")
    out = [head]
    for tail in tails:
        if not tail:
            raise _GiveUp
        if tail[0] == "{":
            out.append("\\frac" + tail)
            continue
        if len(tail) < 2:
            return s
        numerator, second, rest = tail[0], tail[1], tail[2:]
        if second == "{":
            out.append("\\frac{" + numerator + "}" + second + rest)
        else:
            out.append("\\frac{" + numerator + "}{" + second + "}" + rest)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    parts = s.split("/")
    if len(parts) == 2 and all(_CANONICAL_INT.fullmatch(p) and p != "-0" for p in parts):
        return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return s


def normalize(answer: str) -> str | None:
    """The reference's canonical form of an answer string, or None where the reference gives up.

    Collapses LaTeX spelling variants (``\\dfrac``/``\\tfrac``, ``\\frac12``, ``\\sqrt2``, ``a/b``, ``0.5``),
    drops ``\\left``/``\\right``, degrees, dollar and percent signs, a trailing ``\\text{ unit}``, spaces,
    and a short ``x =`` prefix.
    """
    try:
        s = answer
        for junk in _DELETIONS_BEFORE_UNITS:
            s = s.replace(junk, "")
        s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
        for junk in _DELETIONS_AFTER_FRAC:
            s = s.replace(junk, "")
        s = _drop_right_units(s)
        s = s.replace("\\%", "")
        s = s.replace(" .", " 0.").replace("{.", "{0.")
        if not s:
            return s
        if s[0] == ".":
            s = "0" + s
        sides = s.split("=")
        if len(sides) == 2 and len(sides[0]) <= 2:
            s = sides[1]
        s = _brace_sqrt(s).replace(" ", "")
        s = _brace_fracs(s)
        if s == "0.5":
            s = "\\frac{1}{2}"
        return _slash_to_frac(s)
    except _GiveUp:
        return None


def equivalent(answer: str, reference: str) -> bool:
    """Reference-normalized string equality; raw equality when either side cannot be normalized."""
    left, right = normalize(answer), normalize(reference)
    if left is None or right is None:
        return answer == reference
    return left == right


def compute_score(
    solution_str: str, ground_truth: str, *, use_math_verify: bool = False, math_verify_timeout: float = 5.0
) -> float:
    """1.0 if the last boxed answer of ``solution_str`` equals ``ground_truth``, else 0.0.

    ``use_math_verify`` also accepts answers math-verify proves equal (``0.25`` vs ``\\frac14``); it runs in
    a separate process that is killed after ``math_verify_timeout`` seconds, so the call is safe in threads
    and Ray workers. Never raises on any ``solution_str``.
    """
    if not isinstance(ground_truth, str):
        raise TypeError(
            f"MATH ground_truth must be the reference answer string, got {type(ground_truth).__name__}; "
            "prepare the data with experiments/math/data_preprocess/math_dataset.py"
        )
    if not isinstance(solution_str, str):
        return 0.0
    answer = last_boxed_answer(solution_str)
    if answer is None:
        return 0.0
    if equivalent(answer, ground_truth):
        return 1.0
    if use_math_verify:
        from verl_tre.utils.reward_score.math_verify_worker import verify_equal

        return 1.0 if verify_equal(answer, ground_truth, timeout=math_verify_timeout) else 0.0
    return 0.0
