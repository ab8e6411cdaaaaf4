"""0/1 reward for two-operand arithmetic: is the last integer in the response the answer?

Lenient on format on purpose (a small chat model writes "7 + 5 = 12", "The answer is 12." or "12"), strict on the
value: the last run of digits (with an optional minus sign directly before it, thousands separators "1,234"
allowed) must equal the ground truth's ``answer``. Responses are scanned once, so any input costs linear time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (None if there is none)."""
    found = None
    for found in _INTEGER.finditer(text):
        pass
    return None if found is None else int(found.group().replace(",", ""))


def compute_score(solution_str: str, ground_truth: Mapping[str, Any]) -> float:
    """1.0 when the response's last integer equals ``ground_truth["answer"]``, else 0.0."""
    return 1.0 if last_integer(solution_str) == int(ground_truth["answer"]) else 0.0
