"""Final-answer extraction for majority voting.

maj@k needs to know which responses agree. For the project's data sources the task reward modules say what
the answer is (MATH-like: the last box in the reference's normal form; Countdown: the equation of a
well-formed response; HH: none). Other data sources (e.g. an unlabeled validation dump) fall back to the
last ``\\boxed{...}``, else the last ``<answer>...</answer>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Extractor = Callable[[str, str], "str | None"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None (also when left unclosed)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def fallback_extract(data_source: str, text: str) -> str | None:
    """Last boxed answer, else last <answer> tag, whitespace removed so that spacing does not split votes."""
    found = last_boxed(text)
    if found is None:
        tags = _ANSWER_TAG.findall(text)
        found = tags[-1] if tags else None
    if found is None:
        return None
    found = re.sub(r"\s+", "", found)
    return found or None


def project_extract(data_source: str, text: str) -> str | None:
    """The answer as the task's reward reads it, so that voting groups what the grader treats alike."""
    from verl_tre.data import sources
    from verl_tre.utils.reward_score import countdown, math

    if data_source in sources.MATH_LIKE:
        boxed = math.last_boxed_answer(text)
        if boxed is None:
            return None
        normal = math.normalize(boxed)
        return (normal if normal is not None else boxed.strip()) or None
    if data_source == sources.COUNTDOWN:
        equation = countdown.extract_answer(text)
        if equation is None:
            return None
        return re.sub(r"\s+", "", equation) or None
    if data_source == sources.HH:
        return None  # open-ended answers: nothing to vote on
    return fallback_extract(data_source, text)
