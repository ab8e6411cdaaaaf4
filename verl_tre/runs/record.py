"""The run's record while it trains: every run writes its metrics to its own directory, independent of any service.

Layout under ``trainer.default_local_dir`` (the run's directory):

- ``run.json``: {"task", "model", "model_size", "method", "name", "seed", "seed_group", "config_hash",
  "method_options", "config"} (config fully resolved; the identity fields are explained in
  verl_tre/runs/identity.py), written atomically when the trainer starts (again on resume, same content), and
  once the trainer has returned from its last step, with ``"finished": {"step", "time", "total_training_steps",
  "total_epochs"}`` added (the last logged step and the run length that launch asked for).
- ``metrics.jsonl``: one line per ``logger.log`` call of verl's trainer, i.e. per training step, plus step 0 for
  the validation before training: {"step": int, "time": unix seconds, "metrics": {name: float}}. Lines are
  appended and flushed as they happen, so a killed run keeps every finished step; readers should tolerate a
  truncated last line.

``install()`` makes verl's ``Tracking`` (the trainer's logger, whatever backends are configured) also write
these records and keep the checkpoints within their retention (verl_tre.runs.checkpoints); it runs in every Ray
worker process through the entry point's setup hook.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from verl_tre.runs import checkpoints, identity
from verl_tre.runs.methods import detect_method

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def run_summary(config: Mapping[str, Any]) -> dict:
    """The run.json content for a resolved config (plain containers)."""
    ours = config.get("verl_tre") or {}
    actor_rollout_ref = config["actor_rollout_ref"]
    return {
        "task": ours.get("task"),
        "model": actor_rollout_ref["model"]["path"],
        "model_size": ours.get("model_size"),
        "method": detect_method(actor_rollout_ref["actor"]),
        **identity.summary_fields(config),
        "config": dict(config),
    }


def _as_float(value) -> float | None:
    """Scalar metric value as a float (numpy and torch scalars included); None for non-scalars."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return float(item())
    return None


def _write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """run.json, replaced atomically: a reader sees the old record or the new one, never half of one."""
    text = json.dumps(summary, indent=2, default=str, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_FILE}.", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, run_dir / RUN_FILE)


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """run.json of ``run_dir``, or None when it has none."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def logged_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of metrics.jsonl in file order (a truncated line skipped); empty when nothing was logged."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return steps


def mark_finished(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> dict | None:
    """Record in run.json that the trainer returned from its last step; returns the ``finished`` entry (None when
    the run writes no record). ``config``: the launch's resolved config, whose run length the entry keeps."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is None:
        return None
    trainer = config["trainer"]
    summary["finished"] = {"step": max(logged_steps(run_dir), default=0), "time": time.time(),
                           "total_training_steps": trainer.get("total_training_steps"),
                           "total_epochs": trainer.get("total_epochs")}
    _write_summary(run_dir, summary)
    return summary["finished"]


def _drop_partial_line(path: Path) -> None:
    """Cut a line a killed run left half-written, so a resumed run's first line does not run into it."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class RunRecorder:
    """Writes run.json and appends metrics.jsonl in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, summary: Mapping[str, Any]):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_summary(self.run_dir, summary)
        _drop_partial_line(self.run_dir / METRICS_FILE)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")

    def log(self, data: Mapping[str, Any], step: int) -> None:
        """Append one step. Non-scalar values are skipped; NaN/inf are kept (JSON NaN/Infinity)."""
        metrics = {}
        for name, value in data.items():
            number = _as_float(value)
            if number is not None:
                metrics[str(name)] = number
        line = json.dumps({"step": int(step), "time": time.time(), "metrics": metrics}, allow_nan=True)
        self._metrics.write(line + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()


def _recording_tracking(base):
    class RecordingTracking(base):
        """verl's Tracking that also writes the local run record of the run and keeps its checkpoints within
        their retention."""

        def __init__(self, project_name, experiment_name, default_backend="console", config=None):
            super().__init__(project_name, experiment_name, default_backend=default_backend, config=config)
            ours = (config or {}).get("verl_tre")  # only configs composed by verl_tre's entry point
            if ours is None:
                return
            run_dir = config["trainer"]["default_local_dir"]
            if ours.get("run_record", True):
                self.logger["run_record"] = RunRecorder(run_dir, run_summary(config))
            self.logger["checkpoint_retention"] = checkpoints.CheckpointRetention(run_dir, checkpoints.keep_counts(config))

    return RecordingTracking


def install() -> None:
    """Make verl's trainer logger write run records and prune checkpoints (ray_trainer imports Tracking at fit
    time)."""
    import verl.utils.tracking as tracking

    if not getattr(tracking.Tracking, "_verl_tre_records", False):
        tracking.Tracking = _recording_tracking(tracking.Tracking)
        tracking.Tracking._verl_tre_records = True

