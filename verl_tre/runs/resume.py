"""What a launch does with the directory its run names: start there, resume what it holds, or nothing.

``decide`` runs before Ray starts, with the directory's lock held (verl_tre.runs.lock), and refuses every launch
that would mix two runs in one record:

* a directory whose run.json records another training configuration (listing the differing keys), checkpoints
  without a run.json, and ``trainer.resume_mode=disable`` over an existing run;
* an unfinished run without a checkpoint: relaunching it would train from step 1 again and log those steps a
  second time.

A finished run (run.json has ``finished``, see verl_tre.runs.record) is left alone when the launch asks for no
more steps than it ran: ``decide`` says so and nothing trains. So is a run whose latest checkpoint is already at
the launch's last step (it was stopped after that step, before the launch could mark it finished): verl would
load that checkpoint and train one step past the end. ``verl_tre.resume_anyway=true`` waives the
refusals (the run continues with the new settings or from scratch), never the lock or a finished run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from verl_tre.runs import checkpoints, identity, record
from verl_tre.trainer.config_check import ConfigError


@dataclass
class Launch:
    """What a launch will do: ``start`` (nothing to resume), ``resume`` (from the checkpoint of ``step``) or
    ``finished`` (the run already ran as far as this launch asks, to ``step``)."""

    action: str
    step: int | None = None

    def describe(self) -> str:
        """A few words for a plan or a log line."""
        if self.action == "finished":
            return f"finished at step {self.step}: nothing to train"
        return f"resumes from step {self.step}" if self.action == "resume" else "starts"


def _ways_out() -> str:
    return ("Either start a new run in its own directory (leave trainer.experiment_name=auto, or give another "
            "trainer.experiment_name / trainer.default_local_dir), or, if you mean to continue that run with the "
            f"new settings, add {identity.RESUME_ANYWAY_KEY}=true.")


def _difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines


def _covers(finished: Mapping[str, Any], trainer: Mapping[str, Any]) -> bool:
    """Whether a run that finished as ``finished`` already ran as far as a launch with ``trainer`` settings asks."""
    steps, epochs = trainer.get("total_training_steps"), trainer.get("total_epochs")
    if (steps, epochs) == (finished.get("total_training_steps"), finished.get("total_epochs")):
        return True
    return steps is not None and steps <= finished.get("step", 0)


def _length(summary: Mapping[str, Any], trainer: Mapping[str, Any]) -> int | None:
    """The step a launch with ``trainer`` settings trains to: trainer.total_training_steps, else (same epochs) the
    length verl computed for the recorded run and wrote into its actor's optim section; None when unknown."""
    if trainer.get("total_training_steps") is not None:
        return trainer.get("total_training_steps")
    recorded = summary.get("config") or {}
    if identity.lookup(recorded, "trainer.total_epochs") != trainer.get("total_epochs"):
        return None
    length = identity.lookup(recorded, "actor_rollout_ref.actor.optim.total_training_steps")
    return length if isinstance(length, int) and length > 0 else None


def _changed_configuration(directory: Path, mode: str, recorded: Mapping[str, Any], config: DictConfig) -> str | None:
    changed = _difference(identity.training_config(recorded), identity.training_config(config))
    if not changed:
        return None
    shown = "\n".join(f"    {line}" for line in changed[:25])
    more = f"\n    ... and {len(changed) - 25} more" if len(changed) > 25 else ""
    what = "resume" if checkpoints.latest_step(directory) is not None else "append to"
    return (f"trainer.resume_mode={mode} would {what} the run in {directory}, whose recorded configuration "
            f"differs from this launch in {len(changed)} key(s):\n{shown}{more}\n  {_ways_out()}")


def _no_checkpoint(directory: Path, steps: list[int], finished: Mapping[str, Any] | None, config: DictConfig) -> str:
    if finished:
        state = (f"finished at step {finished['step']} without saving a checkpoint, so training it further "
                 f"(trainer.total_training_steps={config.trainer.total_training_steps}, trainer.total_epochs="
                 f"{config.trainer.total_epochs}) would start over at step 1")
    else:
        state = (f"logged steps up to {max(steps)} but saved no checkpoint (trainer.save_freq="
                 f"{config.trainer.save_freq}), so relaunching it would train from step 1 again")
    return (f"{directory} holds a run that {state} and log its steps a second time into the same record. Either "
            f"delete {directory} to train it again from scratch, or start a new run in its own directory "
            f"(trainer.experiment_name=<new name>); give it trainer.save_freq=<N> to be able to resume it. To "
            f"append to that record anyway, add {identity.RESUME_ANYWAY_KEY}=true.")


def decide(config: DictConfig) -> Launch:
    """What this launch does with its run directory; ConfigError when it must not write there. ``config``: the
    resolved launch config."""
    mode = config.trainer.resume_mode
    directory = identity.run_dir(config)
    if mode == "resume_path":
        directory = Path(os.path.abspath(os.path.expanduser(str(config.trainer.resume_from_path)))).parent
    anyway = bool(OmegaConf.select(config, identity.RESUME_ANYWAY_KEY))
    source = checkpoints.resume_source(config)
    step = checkpoints.step_of(source) if source is not None else None
    resumable = Launch("resume", step) if step is not None else Launch("start")
    summary = record.read_summary(directory)
    if summary is None:
        if step is not None and not anyway:
            raise ConfigError(f"{directory} holds checkpoints but no {record.RUN_FILE}, so nothing says which "
                              f"configuration made them. {_ways_out()}")
        return resumable
    if mode == "disable":
        if anyway:
            return resumable
        raise ConfigError(f"{directory} already holds a run ({record.RUN_FILE}); trainer.resume_mode=disable would "
                          f"start over there and mix the new run's metrics into the old record. Delete that "
                          f"directory to start over. {_ways_out()}")
    problem = None if anyway else _changed_configuration(directory, mode, summary.get("config", {}), config)
    if problem:
        raise ConfigError(problem)
    finished = summary.get("finished")
    if finished and _covers(finished, config.trainer):
        return Launch("finished", finished["step"])
    length = _length(summary, config.trainer)
    if step is not None and length is not None and step >= length:
        return Launch("finished", step)
    steps = record.logged_steps(directory)
    if step is None and (steps or finished) and not anyway:
        raise ConfigError(_no_checkpoint(directory, steps, finished, config))
    if step is not None and not (source / "actor").is_dir():
        raise ConfigError(_missing_checkpoint(directory, source))
    return resumable


def _missing_checkpoint(directory: Path, source: Path) -> str:
    """verl deletes the oldest checkpoint before it writes the next: with one kept, a save that dies leaves the
    tracker naming a checkpoint whose model is gone, and the resume would fail inside Ray."""
    complete = [str(step) for step, folder in checkpoints.checkpoint_dirs(directory)
                if folder != source and (folder / "actor").is_dir()]
    older = (f"resume from a complete one (step {', '.join(complete)}) with trainer.resume_mode=resume_path "
             f"trainer.resume_from_path={directory}/global_step_<N>, or " if complete else "")
    return (f"{directory}/{checkpoints.CHECKPOINT_TRACKER} names {source.name}, which holds no actor checkpoint (a "
            f"save that died after verl deleted the previous checkpoint, e.g. with trainer.max_actor_ckpt_to_keep=1). "
            f"Either {older}delete {directory} to train again from scratch; keep 2 checkpoints "
            f"(trainer.max_actor_ckpt_to_keep=2) so that a dying save leaves a complete one.")
