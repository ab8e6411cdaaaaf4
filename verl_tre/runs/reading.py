"""Read the local records of training runs back: ``run.json`` and ``metrics.jsonl`` in each run directory.

``metrics.jsonl`` holds one JSON object per training step, ``{"step", "time", "metrics": {name: value}}``
with verl's metric names plus the project's (``actor/ref/entropy_full``, ``actor/regularizer/value``, ...);
``run.json`` holds ``task``, ``model``, ``model_size``, ``method`` and the resolved ``config``, and in newer records
``seed``, ``seed_group`` (equal for runs that differ only in the seed), ``method_options``, ``config_hash`` and,
once the run is done, ``finished`` (verl_tre/runs/record.py writes them). Both files are read tolerantly: a
truncated last line (a run killed mid-write) is dropped, a step logged twice (a run resumed from a checkpoint)
keeps the last value of each metric, and fields missing from ``run.json`` are inferred from the config, the model
name or the directory name. verl_tre/runs/groups.py gathers the runs of one seed group for the tables and plots.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from verl_tre.data import sources
from verl_tre.runs import identity, methods
from verl_tre.runs.methods import METHODS

TASKS = ("math", "countdown", "hh")
TASK_LABELS = {"math": "MATH", "countdown": "Countdown", "hh": "HH"}
MODEL_SIZES = ("1.5b", "7b")

# Validation data source a task's table cell reports when a run validates on several (the paper's test sets).
TASK_DATA_SOURCES = {"math": (sources.MATH,), "countdown": (sources.COUNTDOWN,), "hh": (sources.HH,)}

_VAL_KEY = re.compile(r"^val-core/(?P<source>.+)/(?P<var>[^/]+)/mean@(?P<n>\d+)$")


@dataclass
class Run:
    """One training run. ``metrics``: rows indexed by step (ascending), one column per metric name."""

    path: str
    task: str | None
    model: str | None
    model_size: str | None
    method: str | None
    config: dict[str, Any]
    metrics: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    seed: int | None = None
    seed_group: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def size_label(self) -> str:
        return self.model_size or "other size"

    @property
    def method_label(self) -> str:
        return METHODS.get(self.method or "", self.method or "unknown")

    def series(self, *names: str) -> pd.Series | None:
        """The first of ``names`` this run logged, as a step-indexed series without missing values."""
        for name in names:
            if name in self.metrics.columns:
                s = self.metrics[name].dropna()
                if len(s):
                    return s
        return None

    def validation_sources(self) -> dict[str, str]:
        """Validation data source -> its core key (``val-core/<source>/<var>/mean@<n>``), "acc" preferred."""
        found: dict[str, tuple[int, str]] = {}
        for col in self.metrics.columns:
            m = _VAL_KEY.match(col)
            if not m or self.metrics[col].dropna().empty:
                continue
            rank = 0 if m["var"] == "acc" else 1 if m["var"] == "reward" else 2
            prev = found.get(m["source"])
            if prev is None or rank < prev[0]:
                found[m["source"]] = (rank, col)
        return {src: col for src, (_, col) in sorted(found.items())}

    def validation_key(self, data_source: str | None = None) -> str | None:
        """The core validation key to report: the source matching ``data_source`` (substring, case-insensitive),
        else the task's preferred source, else the only or alphabetically first one; None when never validated."""
        sources = self.validation_sources()
        if not sources:
            return None
        prefs = (data_source,) if data_source else TASK_DATA_SOURCES.get(self.task or "", ())
        for pref in prefs:
            for src, col in sources.items():
                if pref.lower() in src.lower():
                    return col
        if data_source:
            return None
        return next(iter(sources.values()))


def read_metrics(path: str) -> tuple[pd.DataFrame, list[str]]:
    """Parse ``metrics.jsonl``: (step-indexed frame, notes on what was dropped).

    Non-finite or non-numeric values become NaN (shown as missing) instead of failing the whole run.
    """
    notes: list[str] = []
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    records: dict[int, dict[str, float]] = {}
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
            step = int(rec["step"])
            values = rec.get("metrics", {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == len(lines) - 1:
                notes.append(f"dropped a truncated last line in {path}")
                break
            raise ValueError(f"{path} line {i + 1} is not a step record ({e}); fix or remove that line") from e
        row = {}
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            row[k] = v if math.isfinite(v) else float("nan")
        if step in records:
            notes.append(f"step {step} logged more than once in {path} (a resumed run?): kept each metric's last value")
        # Per metric, not per record: a resumed run logs its validation at the resumed step on a line of its own,
        # which must not erase that step's training metrics.
        records.setdefault(step, {}).update(row)
    frame = pd.DataFrame.from_dict(records, orient="index").sort_index()
    frame.index.name = "step"
    return frame, notes


def detect_method(config: dict[str, Any]) -> str | None:
    """The method a resolved config trains, by the trainer's own rule; None without an actor section."""
    actor = config.get("actor_rollout_ref", {}).get("actor")
    return methods.detect_method(actor) if isinstance(actor, dict) else None


def detect_model_size(model: str | None) -> str | None:
    """"1.5b" or "7b" from a model name or path such as ".../Qwen2.5-7B-Instruct"."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model or "")
    return f"{m[1]}b" if m else None


def _detect_task(config: dict[str, Any], name: str) -> str | None:
    files = " ".join(str(v) for k, v in identity.flatten(config.get("data", {})).items() if k.endswith("files"))
    for text in (files.lower(), name.lower()):
        for task in TASKS:
            if task in text:
                return task
    return None


def read_run(path: str) -> Run:
    """Read one run directory; raises if it has no ``metrics.jsonl``."""
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(
            f"{path} has no metrics.jsonl: pass training run directories (trainer.default_local_dir of a run)"
        )
    metrics, notes = read_metrics(metrics_path)
    info: dict[str, Any] = {}
    info_path = os.path.join(path, "run.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    else:
        notes.append(f"{path} has no run.json: task, model size and method inferred")
    config = info.get("config") or {}
    ours = config.get("verl_tre") or {}  # the trainer's own section: task and model-size presets
    name = os.path.basename(os.path.normpath(path))
    model = info.get("model") or config.get("actor_rollout_ref", {}).get("model", {}).get("path")
    method = info.get("method") or detect_method(config)
    if method is None:
        method = next((m for m in sorted(METHODS, key=len, reverse=True) if m in name.lower()), None)
    return Run(
        path=path,
        task=info.get("task") or ours.get("task") or _detect_task(config, name),
        model=model,
        model_size=info.get("model_size") or ours.get("model_size") or detect_model_size(model),
        method=method,
        config=config,
        metrics=metrics,
        notes=notes,
        seed=info.get("seed"),
        seed_group=info.get("seed_group"),
        method_options=dict(info.get("method_options") or {}),
        config_hash=info.get("config_hash"),
    )


def find_run_dirs(paths: list[str]) -> list[str]:
    """Run directories among ``paths``: each path itself if it holds ``metrics.jsonl``, else every directory
    below it that does (so a whole experiments folder can be passed)."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a directory; pass training run directories or a folder of them")
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            found.append(path)
            continue
        below = sorted(root for root, _, files in os.walk(path) if "metrics.jsonl" in files)
        if not below:
            raise FileNotFoundError(f"no metrics.jsonl in or below {path}; is it a training run directory?")
        found.extend(below)
    return found


def read_runs(paths: list[str], report: Callable[[str], None] | None = None) -> list[Run]:
    """Read the runs in or below ``paths``; each note (dropped line, inferred field) goes to ``report``."""
    runs = [read_run(p) for p in find_run_dirs(paths)]
    if report:
        for run in runs:
            for note in run.notes:
                report(note)
    return runs


def print_note(note: str) -> None:
    """``report`` for command-line tools: the note on stderr."""
    print(f"note: {note}", file=sys.stderr)


def run_command(main: Callable[[], None]) -> None:
    """Run a reporting command's ``main``; bad input (ValueError, FileNotFoundError) ends it with its one-line
    message instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # the message says what to fix
        sys.exit(f"error: {error}")
