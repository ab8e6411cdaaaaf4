"""Local run records: every training run writes its metrics to its own directory, independent of any service.

Layout under ``trainer.default_local_dir`` (the run's checkpoint directory):

- ``run.json``: {"task", "model", "model_size", "method", "name", "seed", "seed_group", "config_hash",
  "method_options", "config"} (config fully resolved; the identity fields are explained in
  verl_tre/trainer/run_identity.py), written
  atomically when the trainer starts (again on resume, same content).
- ``metrics.jsonl``: one line per ``logger.log`` call of verl's trainer, i.e. per training step, plus step 0 for
  the validation before training: {"step": int, "time": unix seconds, "metrics": {name: float}}. Lines are
  appended and flushed as they happen, so a killed run keeps every finished step; readers should tolerate a
  truncated last line.

``install()`` makes verl's ``Tracking`` (the trainer's logger, whatever backends are configured) also write
these records; it runs in every Ray worker process through the entry point's setup hook.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def detect_method(actor: Mapping[str, Any]) -> str:
    """The paper's method name for an actor config: ppo, entropy, forking_tokens, kl_cov, tre_k or tre_p."""
    trust_region = actor.get("trust_region") or {}
    forking = actor.get("forking_tokens") or {}
    loss_mode = (actor.get("policy_loss") or {}).get("loss_mode", "vanilla")
    coeff = float(actor.get("entropy_coeff") or 0.0)
    if forking.get("enable", False):
        return "forking_tokens"
    if loss_mode in ("clipped_kl_cov", "kl_cov"):
        return "kl_cov"
    if coeff > 0:
        mode = trust_region.get("mode", "full")
        return {"top_k": "tre_k", "top_p": "tre_p"}.get(mode, "entropy")
    return "ppo"


def run_summary(config: Mapping[str, Any]) -> dict:
    """The run.json content for a resolved config (plain containers)."""
    from verl_tre.trainer import run_identity

    ours = config.get("verl_tre") or {}
    actor_rollout_ref = config["actor_rollout_ref"]
    return {
        "task": ours.get("task"),
        "model": actor_rollout_ref["model"]["path"],
        "model_size": ours.get("model_size"),
        "method": detect_method(actor_rollout_ref["actor"]),
        **run_identity.summary_fields(config),
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


class RunRecorder:
    """Writes run.json and appends metrics.jsonl in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, summary: Mapping[str, Any]):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(summary, indent=2, default=str, allow_nan=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{RUN_FILE}.", dir=self.run_dir)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.run_dir / RUN_FILE)
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
        """verl's Tracking that also writes the local run record of the run."""

        def __init__(self, project_name, experiment_name, default_backend="console", config=None):
            super().__init__(project_name, experiment_name, default_backend=default_backend, config=config)
            ours = (config or {}).get("verl_tre")  # only configs composed by verl_tre's entry point
            if ours is not None and ours.get("run_record", True):
                self.logger["run_record"] = RunRecorder(config["trainer"]["default_local_dir"], run_summary(config))

    return RecordingTracking


def install() -> None:
    """Make verl's trainer logger write run records (ray_trainer imports Tracking at fit time)."""
    import verl.utils.tracking as tracking

    if not getattr(tracking.Tracking, "_verl_tre_records", False):
        tracking.Tracking = _recording_tracking(tracking.Tracking)
        tracking.Tracking._verl_tre_records = True

