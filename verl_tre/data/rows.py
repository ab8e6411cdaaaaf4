"""verl's row format and the loop that turns source records into rows, stopping or skipping on bad ones.

A verl RL row is::

    {"data_source": str, "prompt": [{"role": "user", "content": str}], "ability": str,
     "reward_model": {"style": "rule" | "model", "ground_truth": ...},
     "extra_info": {"split": str, "index": int, ...}}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


class BadRow(ValueError):
    """A source record that cannot become a row; the message says why."""


class BadRowsError(ValueError):
    """Raised to stop preparation at the first bad record (unless bad rows are skipped)."""


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a record the loader could not decode (e.g. a malformed JSON line)."""

    reason: str


def make_row(
    data_source: str,
    prompt: str,
    ability: str,
    ground_truth: Any,
    split: str,
    index: int,
    *,
    reward_style: str = "rule",
    extra_info: dict | None = None,
) -> dict:
    """One row in verl's format; ``index`` is the record's position in its source, ``extra_info`` extends it."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": ability,
        "reward_model": {"style": reward_style, "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, **(extra_info or {})},
    }


def require_text(record: Any, *keys: str) -> str:
    """The first of ``keys`` that holds a non-empty string in ``record``; BadRow naming them otherwise."""
    if not isinstance(record, dict):
        raise BadRow(f"expected an object with field {' or '.join(map(repr, keys))}, got {type(record).__name__}")
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise BadRow(f"needs a non-empty text field {' or '.join(map(repr, keys))}; has fields {sorted(record)}")


def convert_records(
    records: Iterable[tuple[int, Any]],
    convert: Callable[[Any, int], dict],
    *,
    skip_bad_rows: bool,
    desc: str,
    total: int | None = None,
) -> tuple[list[dict], int]:
    """Rows for ``(source_index, record)`` pairs and the number of records skipped.

    ``convert(record, source_index)`` builds a row or raises :class:`BadRow`. Without ``skip_bad_rows`` the
    first bad record raises :class:`BadRowsError` with its index and reason.
    """
    rows, skipped = [], 0
    for index, record in tqdm(records, desc=desc, total=total, unit="row", mininterval=1.0):
        try:
            if isinstance(record, Unreadable):
                raise BadRow(record.reason)
            rows.append(convert(record, index))
        except BadRow as error:
            if not skip_bad_rows:
                raise BadRowsError(
                    f"{desc}: record {index} is malformed: {error} (fix it, or pass --skip-bad-rows to skip and count such rows)"
                ) from error
            skipped += 1
    return rows, skipped
