"""A run's checkpoints on disk: which exist, which one a launch resumes from, and how many are kept.

verl saves ``global_step_<N>/{actor,critic,data.pt}`` under ``trainer.default_local_dir`` and writes N into
``latest_checkpointed_iteration.txt``. Its retention (``trainer.max_actor_ckpt_to_keep``,
``max_critic_ckpt_to_keep``) remembers only the checkpoints its own process saved, and deletes only their
``actor``/``critic`` folders: every relaunch would leave the previous process's checkpoints (and each deleted
one's ``data.pt``) behind. ``prune`` keeps the newest N of each role on disk whoever wrote them, and drops
``global_step_*`` folders left without any model; the launch runs it before verl resumes (never touching the
checkpoint it resumes from), and ``CheckpointRetention`` runs it in the trainer's process after every step (verl
saves a step's checkpoint before logging the step).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from verl_tre.runs import identity

CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
ROLES = ("actor", "critic")
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def step_of(folder: str | os.PathLike) -> int | None:
    """N of a ``global_step_<N>`` folder; None for any other name."""
    m = _STEP_DIR.match(Path(folder).name)
    return int(m[1]) if m else None


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every ``global_step_<N>`` folder in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((step_of(entry), entry) for entry in run_dir.iterdir() if entry.is_dir() and step_of(entry) is not None)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The step verl's tracker names as the latest checkpoint, or None when nothing was saved."""
    tracker = Path(run_dir) / CHECKPOINT_TRACKER
    try:
        return int(tracker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def keep_counts(config: Mapping[str, Any]) -> dict[str, int | None]:
    """{role: checkpoints to keep} as verl's trainer reads them (None: keep all)."""
    if identity.lookup(config, "trainer.remove_previous_ckpt_in_save"):  # verl's deprecated spelling of "keep 1"
        return {role: 1 for role in ROLES}
    return {role: identity.lookup(config, f"trainer.max_{role}_ckpt_to_keep") for role in ROLES}


def resume_source(config: Mapping[str, Any]) -> Path | None:
    """The checkpoint folder verl will load for this launch, or None (a fresh start)."""
    mode = identity.lookup(config, "trainer.resume_mode")
    if mode == "resume_path":
        return Path(os.path.abspath(os.path.expanduser(str(identity.lookup(config, "trainer.resume_from_path")))))
    run_dir = Path(str(identity.lookup(config, "trainer.default_local_dir")))
    step = latest_step(run_dir) if mode == "auto" else None
    return None if step is None else run_dir / f"global_step_{step}"


def prune(run_dir: str | os.PathLike, keep: Mapping[str, int | None], protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep[role]`` checkpoints of each role in ``run_dir`` (a count that is None or
    < 1 keeps all of that role), then every ``global_step_*`` folder left without a model; ``protect`` (the
    checkpoint being resumed from) is never touched. Returns the deleted paths."""
    if not any(isinstance(n, int) and n >= 1 for n in keep.values()):
        return []
    protect = Path(os.path.abspath(protect)) if protect is not None else None
    folders = [folder for _, folder in checkpoint_dirs(run_dir)]
    deletable = [folder for folder in folders if Path(os.path.abspath(folder)) != protect]
    removed = []
    for role in ROLES:
        count = keep.get(role)
        if not isinstance(count, int) or count < 1:
            continue
        # Counted over all folders, the protected one included: an old protected checkpoint is kept beside the
        # newest ones, not in place of one.
        holding = [folder for folder in folders if (folder / role).is_dir()]
        for folder in holding[:-count]:
            if folder in deletable:
                shutil.rmtree(folder / role, ignore_errors=True)
                removed.append(folder / role)
    for folder in deletable:
        if not any((folder / role).exists() for role in ROLES):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class CheckpointRetention:
    """A backend of verl's ``Tracking`` logger that prunes the run's checkpoints after every logged step."""

    def __init__(self, run_dir: str | os.PathLike, keep: Mapping[str, int | None]):
        self.run_dir, self.keep = Path(run_dir), dict(keep)

    def log(self, data: Mapping[str, Any], step: int) -> None:
        """Called by Tracking.log after each step; the step's checkpoint, if any, is complete by then."""
        prune(self.run_dir, self.keep)
