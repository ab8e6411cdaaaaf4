"""Final-answer extraction for majority voting.

maj@k needs to know which responses agree. The task reward package may provide its own extractor
(``verl_tre.utils.reward_score.extract_answer(data_source, solution_str)``); where it does not, the
fallback below reads the last ``\\boxed{...}`` (MATH) or the last ``<answer>...</answer>`` (Countdown).
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


def default_extractor() -> Extractor:
    """The reward package's extractor when it has one, else :func:`fallback_extract`."""
    try:
        from verl_tre.utils.reward_score import extract_answer  # type: ignore[attr-defined]
    except ImportError:
        return fallback_extract
    return extract_answer
