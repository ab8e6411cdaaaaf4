"""MATH rows (train/test) and the MATH500 / AIME validation sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_tre.data import sources
from verl_tre.data.io import load_hub_records, load_local_records, write_parquet_atomic
from verl_tre.data.rows import BadRow, convert_records, make_row, require_text
from verl_tre.utils.reward_score.math import last_boxed_answer


def math_prompt(problem: str) -> str:
    """The paper's MATH prompt: the problem, then the step-by-step/\\boxed instruction."""
    return f"{problem} {sources.MATH_INSTRUCTION}"


def _reference_answer(record: dict) -> str:
    answer = record.get("answer")
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    solution = record.get("solution")
    if isinstance(solution, str):
        boxed = last_boxed_answer(solution)
        if boxed is not None and boxed.strip():
            return boxed
        raise BadRow("its 'solution' has no \\boxed{...} answer and there is no 'answer' field")
    raise BadRow(f"needs an 'answer' or a 'solution' with a \\boxed{{...}} answer; has fields {sorted(record)}")


def math_row(record: Any, index: int, split: str, data_source: str) -> dict:
    """A row from ``{"problem", "solution"}`` (MATH) or ``{"problem", "answer"}`` (MATH500, AIME).

    The ground truth is ``answer`` when present, else the last ``\\boxed{}`` of ``solution`` (the reference's
    MATH ground truth).
    """
    problem = require_text(record, "problem")
    return make_row(data_source, math_prompt(problem), "math", _reference_answer(record), split, index)


@dataclass(frozen=True)
class ValidationSet:
    """A hub dataset used for validation only: its name (also the rows' data_source) and split."""

    hub_name: str
    hub_split: str


VALIDATION_SETS = {
    "math500": ValidationSet(sources.MATH500, "test"),
    "aime2024": ValidationSet(sources.AIME_2024, "train"),
    "aime2022-2024": ValidationSet(sources.AIME_2022_2024, "train"),
}


def _write_split(records: Any, split: str, data_source: str, path: Path, skip_bad_rows: bool) -> tuple[Path, int]:
    rows, skipped = convert_records(
        enumerate(records), lambda r, i: math_row(r, i, split, data_source), skip_bad_rows=skip_bad_rows,
        desc=f"{data_source} {split}", total=len(records),
    )
    return write_parquet_atomic(rows, path), skipped


def write_math_splits(
    output_dir: str | os.PathLike,
    *,
    train_input: str | os.PathLike | None = None,
    test_input: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """MATH train (7.5k) and test (5k) parquet under ``output_dir``, from the hub or from two local files."""
    if (train_input is None) != (test_input is None):
        raise ValueError("pass both --input (train) and --test-input (test), or neither to use the hub")
    result: dict[str, Any] = {"skipped": 0}
    for split, local in (("train", train_input), ("test", test_input)):
        records = load_hub_records(sources.MATH, split) if local is None else load_local_records(local)
        result[split], skipped = _write_split(
            records, split, sources.MATH, Path(output_dir) / f"{split}.parquet", skip_bad_rows
        )
        result["skipped"] += skipped
    return result


def write_validation_set(
    name: str,
    output_dir: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """``output_dir/test.parquet`` for validation set ``name`` (a key of :data:`VALIDATION_SETS`)."""
    if name not in VALIDATION_SETS:
        raise ValueError(f"unknown validation set {name!r}; choose one of {sorted(VALIDATION_SETS)}")
    chosen = VALIDATION_SETS[name]
    records = (
        load_hub_records(chosen.hub_name, chosen.hub_split) if input_path is None else load_local_records(input_path)
    )
    path, skipped = _write_split(records, "test", chosen.hub_name, Path(output_dir) / "test.parquet", skip_bad_rows)
    return {"test": path, "skipped": skipped}
