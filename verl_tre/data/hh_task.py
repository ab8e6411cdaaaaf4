"""HH rows: the first user turn of UltraFeedback (binarized), shuffled with a seed and split 7.5k / 5k.

The user prompt is also kept in ``extra_info["prompt"]``: verl's batch reward manager hands the reward
function ``extra_infos`` but not the prompts, and the reward model scores (prompt, response) pairs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy

from verl_tre.data import sources
from verl_tre.data.io import load_hub_records, load_local_records, write_parquet_atomic
from verl_tre.data.rows import BadRow, convert_records, make_row

NUM_TRAIN = 7_500
NUM_TEST = 5_000
SHUFFLE_SEED = 42


def first_user_turn(record: Any) -> str:
    """The first user message of ``record["chosen"]`` (UltraFeedback) or ``record["prompt"]`` (text or messages)."""
    if not isinstance(record, dict):
        raise BadRow(f"expected an object with 'chosen' or 'prompt', got {type(record).__name__}")
    for key in ("prompt", "chosen"):
        value = record.get(key)
        if isinstance(value, str):
            text = value
        elif isinstance(value, list):
            text = next(
                (m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None
            )
        else:
            continue
        if isinstance(text, str) and text.strip():
            return text
        raise BadRow(f"{key!r} holds no non-empty user message")
    raise BadRow(f"needs 'chosen' (chat messages) or 'prompt'; has fields {sorted(record)}")


def hh_row(record: Any, index: int, split: str) -> dict:
    """A row scored by the reward model (style "model", empty ground truth)."""
    prompt = first_user_turn(record)
    return make_row(
        sources.HH, prompt, "alignment", "", split, index, reward_style="model", extra_info={"prompt": prompt}
    )


def write_hh_splits(
    output_dir: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
    seed: int = SHUFFLE_SEED,
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """Shuffle the records (hub train split by default) with ``seed``, take the first ``num_train`` for
    training and the next ``num_test`` for testing; ``extra_info.index`` is the record's position before
    shuffling. Returns paths and the skipped count."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need --num-train >= 1 and --num-test >= 1, got {num_train} and {num_test}")
    if input_path is None:
        records, origin = load_hub_records(sources.HH, "train"), sources.HH
    else:
        records, origin = load_local_records(input_path), str(input_path)
    # The permutation datasets' Dataset.shuffle(seed=...) applies, so the hub splits match the reference's.
    order = numpy.random.default_rng(seed).permutation(len(records)).tolist()
    if len(records) < num_train + num_test:
        raise ValueError(
            f"{origin} has {len(records)} records, fewer than --num-train {num_train} + --num-test {num_test}"
        )
    result: dict[str, Any] = {"skipped": 0}
    for split, start, count in (("train", 0, num_train), ("test", num_train, num_test)):
        chosen = ((order[i], records[order[i]]) for i in range(start, start + count))
        rows, skipped = convert_records(
            chosen, lambda r, i, s=split: hh_row(r, i, s), skip_bad_rows=skip_bad_rows,
            desc=f"HH {split}", total=count,
        )
        result[split] = write_parquet_atomic(rows, Path(output_dir) / f"{split}.parquet")
        result["skipped"] += skipped
    return result
