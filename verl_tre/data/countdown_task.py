"""Countdown rows and the train/test preparation (hub dataset, local file, or the built-in generator)."""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verl_tre.data import sources
from verl_tre.data.countdown_generator import CountdownInstance, generate_countdown
from verl_tre.data.io import load_hub_records, load_local_records, write_parquet_atomic
from verl_tre.data.rows import BadRow, convert_records, make_row

NUM_TRAIN = 7_500
NUM_TEST = 5_000


def countdown_row(numbers: Sequence[int], target: int, split: str, index: int, solution: str | None = None) -> dict:
    """A verl row for one instance; ``solution`` (generated data only) goes to ``extra_info``."""
    numbers = [int(n) for n in numbers]
    extra = {"solution": solution} if solution is not None else None
    return make_row(
        sources.COUNTDOWN,
        sources.COUNTDOWN_TEMPLATE.format(nums=numbers, target=int(target)),
        "math",
        {"target": int(target), "numbers": numbers},
        split,
        index,
        extra_info=extra,
    )


def instance_rows(instances: Sequence[CountdownInstance], split: str) -> list[dict]:
    """Rows for generated instances, indexed by position."""
    return [countdown_row(x.numbers, x.target, split, i, x.solution) for i, x in enumerate(instances)]


def _record_row(record: Any, index: int, split: str) -> dict:
    if not isinstance(record, dict):
        raise BadRow(f"expected an object with 'target' and 'nums', got {type(record).__name__}")
    numbers = record.get("nums", record.get("numbers"))
    target = record.get("target")
    try:
        numbers = [operator.index(n) for n in numbers]
        target = operator.index(target)
    except TypeError as error:
        raise BadRow(f"needs an integer 'target' and a list of integers 'nums'; got target={target!r}, nums={numbers!r}") from error
    if not numbers:
        raise BadRow("'nums' is empty")
    return countdown_row(numbers, target, split, index)


def write_countdown_splits(
    output_dir: str | os.PathLike,
    *,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
    seed: int = 0,
    progress: bool = True,
    **generator_options: Any,
) -> dict[str, Path]:
    """Generate ``num_train + num_test`` unique instances from ``seed`` and write ``train.parquet`` and
    ``test.parquet`` under ``output_dir`` (no instance is in both). Returns the two paths.

    ``generator_options`` go to :func:`~verl_tre.data.countdown_generator.generate_countdown`.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need --num-train >= 1 and --num-test >= 1, got {num_train} and {num_test}")
    instances = generate_countdown(num_train + num_test, seed=seed, progress=progress, **generator_options)
    return {
        "train": write_parquet_atomic(instance_rows(instances[:num_train], "train"), Path(output_dir) / "train.parquet"),
        "test": write_parquet_atomic(instance_rows(instances[num_train:], "test"), Path(output_dir) / "test.parquet"),
    }


def write_countdown_from_records(
    output_dir: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """The reference's split of a record source (hub by default, or ``input_path``): the first ``num_train``
    records for training, the next ``num_test`` for testing. Returns paths and the skipped count."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need --num-train >= 1 and --num-test >= 1, got {num_train} and {num_test}")
    if input_path is None:
        records = load_hub_records(sources.COUNTDOWN_HUB, "train", " or use --source generate")
        origin = sources.COUNTDOWN_HUB
    else:
        records = load_local_records(input_path)
        origin = str(input_path)
    if len(records) < num_train + num_test:
        raise ValueError(
            f"{origin} has {len(records)} records, fewer than --num-train {num_train} + --num-test {num_test}"
        )
    result: dict[str, Any] = {"skipped": 0}
    for split, start, count in (("train", 0, num_train), ("test", num_train, num_test)):
        chosen = ((i, records[i]) for i in range(start, start + count))
        rows, skipped = convert_records(
            chosen, lambda r, i, s=split: _record_row(r, i, s), skip_bad_rows=skip_bad_rows,
            desc=f"Countdown {split}", total=count,
        )
        result[split] = write_parquet_atomic(rows, Path(output_dir) / f"{split}.parquet")
        result["skipped"] += skipped
    return result
