"""Load the n sampled responses per prompt that the evaluation scores.

Two sources:
- the parquet ``verl.trainer.main_generation`` writes: the dataset's rows (``data_source``,
  ``reward_model.ground_truth``, ``extra_info``) plus a ``responses`` column holding n strings per row;
- the validation generations a training run dumps when ``trainer.validation_data_dir`` is set: one
  ``<step>.jsonl`` per validation, one line per sample with ``input`` (decoded prompt), ``output``,
  ``score`` and the reward function's extra fields (``acc``, ``pred``...), the n samples of a prompt
  sharing its ``input``. These carry no ground truth, so their recorded scores are used as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class PromptSamples:
    """The samples of one prompt. Per-sample lists are filled by loading or by scoring, each of length n."""

    data_source: str
    responses: list[str]
    ground_truth: Any = None
    extra_info: dict | None = None
    scores: list[float] | None = None
    correct: list[bool] | None = None
    answers: list[str | None] | None = field(default=None)


def _to_list(value: Any) -> Any:
    """numpy arrays (how pyarrow returns list and struct cells) to plain Python, recursively."""
    if isinstance(value, np.ndarray):
        return [_to_list(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _to_list(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_generations(path: str, response_key: str = "responses") -> list[PromptSamples]:
    """Rows of a ``main_generation`` parquet as :class:`PromptSamples` (to be scored)."""
    df = pd.read_parquet(path)
    missing = [c for c in (response_key, "data_source", "reward_model") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing} (has {list(df.columns)}); expected the output of "
            f"`python -m verl.trainer.main_generation` on a dataset in verl's format"
        )
    groups = []
    for i, row in enumerate(df.itertuples(index=False)):
        row = row._asdict()
        responses = _to_list(row[response_key])
        if isinstance(responses, str):
            responses = [responses]
        rm = _to_list(row["reward_model"]) or {}
        if not responses or "ground_truth" not in rm:
            raise ValueError(f"{path} row {i}: needs a non-empty '{response_key}' list and reward_model.ground_truth")
        groups.append(
            PromptSamples(
                data_source=str(row["data_source"]),
                responses=[str(r) for r in responses],
                ground_truth=rm["ground_truth"],
                extra_info=_to_list(row.get("extra_info")),
            )
        )
    return groups


def _read_jsonl(path: str) -> list[dict]:
    """Lines of a JSONL file; a truncated last line (a run killed mid-write) is dropped, others must parse."""
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({e}); fix or remove that line") from e
    return rows


def dump_steps(directory: str) -> list[int]:
    """Steps that have a ``<step>.jsonl`` validation dump in ``directory``, ascending."""
    return sorted(int(f[:-6]) for f in os.listdir(directory) if f.endswith(".jsonl") and f[:-6].isdigit())


def load_validation_dump(path: str, step: int | None = None, data_source: str | None = None) -> list[PromptSamples]:
    """Samples of one validation dump, grouped by prompt in first-seen order.

    ``path`` is a ``<step>.jsonl`` file or the dump directory (then ``step`` picks the file, default the
    last). The data source is the entries' ``data_source`` field when the reward function recorded one,
    else ``data_source`` (default "validation").
    """
    if os.path.isdir(path):
        steps = dump_steps(path)
        if not steps:
            raise ValueError(f"{path} holds no <step>.jsonl validation dumps; point at trainer.validation_data_dir")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"{path} has no dump for step {step}; available steps: {steps}")
        path = os.path.join(path, f"{step}.jsonl")
    rows = _read_jsonl(path)
    for i, r in enumerate(rows):
        if "output" not in r or "score" not in r or "input" not in r:
            raise ValueError(f"{path} entry {i} lacks input/output/score; is this a verl validation dump?")
    groups: dict[tuple[str, str], PromptSamples] = {}
    for r in rows:
        ds = str(r.get("data_source", data_source or "validation"))
        g = groups.setdefault((ds, r["input"]), PromptSamples(ds, [], scores=[], correct=[], answers=[]))
        g.responses.append(r["output"])
        g.scores.append(float(r["score"]))
        g.correct.append(bool(r["acc"]) if "acc" in r else None)
        g.answers.append(None if r.get("pred") is None else str(r["pred"]))
    for g in groups.values():
        # Fields a reward function did not record are left for scoring / extraction to fill.
        if any(c is None for c in g.correct):
            g.correct = None
        if all(a is None for a in g.answers):
            g.answers = None
    return list(groups.values())


def load_samples(path: str, step: int | None = None, data_source: str | None = None) -> list[PromptSamples]:
    """Dispatch on the input: a ``.parquet`` generation file, or a validation dump file or directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass a main_generation parquet or a validation dump")
    if path.endswith(".parquet"):
        return load_generations(path)
    if os.path.isdir(path) or path.endswith(".jsonl"):
        return load_validation_dump(path, step=step, data_source=data_source)
    raise ValueError(f"{path}: expected a .parquet (main_generation output), a <step>.jsonl or a dump directory")


def min_samples(groups: Sequence[PromptSamples]) -> int:
    """Smallest number of samples any prompt has (the largest k every prompt supports)."""
    if not groups:
        raise ValueError("no prompts to evaluate: the input is empty")
    return min(len(g.responses) for g in groups)
