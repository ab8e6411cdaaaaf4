"""verl's PPO trainer with TRE: ``python -m verl_tre.trainer.main_ppo [hydra overrides]``.

Accepts every option of ``python -m verl.trainer.main_ppo`` (our config extends verl's ppo_trainer.yaml) plus
ours (actor_rollout_ref.actor.trust_region / forking_tokens, the presets ``task=``, ``model=``, ``method=``, and
the ``verl_tre`` section). Before Ray starts it applies CPU mode (trainer.device=cpu, see
verl_tre/utils/cpu_mode.py) and validates every value (verl_tre/trainer/config_check.py). Then it starts Ray, or
joins the cluster named by RAY_ADDRESS (multi-node: ``ray start`` on every node first), with a worker setup hook
that installs our actor, policy losses and run records in every Ray worker process, and runs verl's trainer.
The launch holds its run directory for as long as the trainer runs (verl_tre/runs/lock.py), skips a run that
already finished, refuses one it would mix into another's record (verl_tre/runs/resume.py), keeps the directory's
checkpoints within their retention before verl resumes (verl_tre/runs/checkpoints.py), and marks the run
finished in its run.json when the trainer returns.

Offline composition: ``verl_tre.dry_run=true`` composes the full config, applies CPU mode, validates it (without
looking for data files or devices), prints it as YAML and exits; nothing starts.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from verl_tre.runs import checkpoints, identity, lock, record, resume
from verl_tre.trainer import config_check
from verl_tre.utils import after_import, cpu_mode

config_check.register_resolvers()

# Environment verl's own entry point gives its Ray job, plus ours; forwarded prefixes reach workers on any node.
_JOB_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "VLLM_LOGGING_LEVEL": "WARN",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
_FORWARDED_PREFIXES = ("VERL_TRE_", "REWARD_SERVER_", "HF_", "TRANSFORMERS_", "WANDB_")


def install_extensions() -> None:
    """Our actor, policy losses and run records, in the current process."""
    from verl_tre import plugin

    plugin.install()
    record.install()


def hide_trl_without_value_head() -> None:
    """verl 0.4.1 imports trl.AutoModelForCausalLMWithValueHead whenever trl is installed (to patch its
    state_dict, and as a critic fallback); trl 0.29 moved it to trl.experimental, so every actor build fails
    with an ImportError. Where the class is gone, make verl treat trl as absent: it then loads the critic with
    AutoModelForTokenClassification, which is what it tries first anyway."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return
    import trl

    if not hasattr(trl, "AutoModelForCausalLMWithValueHead"):
        import verl.models.transformers.monkey_patch as verl_monkey_patch
        import verl.utils.model as verl_model

        verl_monkey_patch.is_trl_available = verl_model.is_trl_available = lambda: False


def setup_worker_process() -> None:
    """Ray's worker_process_setup_hook, in every worker process: patches verl when ``verl.workers`` is first
    imported, before any verl worker class exists (processes that never load it start ~2 s sooner)."""
    after_import.call_after_import("verl.workers", _patch_worker_process)


def _patch_worker_process() -> None:
    if os.environ.get(cpu_mode.ENV_FLAG) == "1":
        cpu_mode.apply_worker_patches()
    hide_trl_without_value_head()
    install_extensions()


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m verl_tre.trainer.main_ppo <overrides>`` would run, composed in-process."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("verl_tre.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=list(overrides))


def prepare(config: DictConfig, launching: bool) -> list[str]:
    """Apply CPU mode, validate ``config``, name the run and resolve it, in place (``launching``: also check what
    depends on this machine, such as data files and devices). Returns the CPU-mode notes."""
    notes = cpu_mode.adjust_config(config)
    install_extensions()
    # Before naming: the name is made of values (the entropy coefficient, K, p, the seed) that must be valid.
    config_check.validate(config, launching=launching)
    identity.assign(config)
    OmegaConf.resolve(config)
    # Absolute, from the launch directory: Ray workers (which write there) may run in another working directory.
    config.trainer.default_local_dir = str(identity.run_dir(config))
    return notes


def check_hh_reward_server(config: DictConfig) -> None:
    """HH scores rollouts with the reward-model server: stop before Ray starts if it does not answer /health."""
    from verl_tre.utils.reward_score.hh import RewardServerError, check_reward_server

    kwargs = OmegaConf.select(config, "reward_model.reward_kwargs") or {}
    try:
        check_reward_server(kwargs.get("hh_url"), kwargs.get("hh_token"))
    except RewardServerError as err:
        raise config_check.ConfigError(
            f"the HH reward server is not ready: {err}\n  Start it first (HH_REWARD_MODEL_PATH = your trained reward "
            f"model): HH_REWARD_MODEL_PATH=/path/to/rm bash experiments/hh/reward/run_with_server.sh, or point "
            f"REWARD_SERVER_URL (or reward_model.reward_kwargs.hh_url) at a running server's /predict URL."
        ) from err


def _job_env(config: DictConfig) -> dict[str, str]:
    env = dict(_JOB_ENV)
    env.update({k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES)})
    env.update(cpu_mode.worker_env(config))
    return env


_SETUP_HOOK = "verl_tre.trainer.main_ppo.setup_worker_process"


def init_ray(config: DictConfig) -> bool:
    """Start Ray, or join the cluster named by RAY_ADDRESS, with our worker setup hook.

    Returns True when this call started the local cluster (the caller then shuts it down).
    """
    import ray

    runtime_env = {"env_vars": _job_env(config), "worker_process_setup_hook": _SETUP_HOOK}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return False
    kwargs = {"num_cpus": OmegaConf.select(config, "ray_init.num_cpus")}
    if cpu_mode.is_cpu_mode(config):
        kwargs.update(cpu_mode.ray_init_kwargs(config))
    ray.init(runtime_env=runtime_env, **kwargs)
    return True


def _require_setup_hook() -> None:
    import ray

    hook = (ray.get_runtime_context().runtime_env or {}).get("worker_process_setup_hook")
    if hook != _SETUP_HOOK:
        raise RuntimeError(
            "Ray is already initialized in this process without verl_tre's worker setup hook, so workers would "
            "build verl's plain actor. Fix: ray.shutdown() first, or start Ray with "
            "verl_tre.trainer.main_ppo.init_ray(config)."
        )


def run(config: DictConfig) -> None:
    """Validate ``config`` and run verl's trainer (or print the config when verl_tre.dry_run=true).

    Holds the run directory from before Ray starts until the trainer returns; a run that already finished is
    reported and not trained again. Starts Ray unless this process already did through ``init_ray``: several runs
    can share one start-up, and each run's placement groups are released when it ends.
    """
    dry_run = bool(OmegaConf.select(config, "verl_tre.dry_run"))
    notes = prepare(config, launching=not dry_run)
    for note in notes:
        print(f"[verl_tre] cpu mode: {note}", file=sys.stderr)
    directory = identity.run_dir(config)
    print(f"[verl_tre] run {config.trainer.experiment_name} (seed {config.verl_tre.seed}) in {directory}",
          file=sys.stderr)
    print(f"[verl_tre] actor lm head: {config_check.lm_head_backend(config)}", file=sys.stderr)
    if dry_run:
        print(OmegaConf.to_yaml(config))
        return
    with lock.hold(directory):
        launch = resume.decide(config)
        if launch.action == "finished":
            if "finished" not in record.read_summary(directory):  # stopped after its last step, before the mark
                record.mark_finished(directory, config)
            print(f"[verl_tre] run {config.trainer.experiment_name} already {launch.describe()} (run.json in "
                  f"{directory}). To train it further, raise trainer.total_training_steps: it resumes from its last "
                  f"checkpoint.", file=sys.stderr)
            return
        if config.verl_tre.task == "hh":
            check_hh_reward_server(config)
        checkpoints.prune(directory, checkpoints.keep_counts(config), protect=checkpoints.resume_source(config))
        _run_trainer(config)
        if not config.trainer.val_only:
            record.mark_finished(directory, config)


def _run_trainer(config: DictConfig) -> None:
    """verl's run_ppo, in this process's Ray session or in one it starts (and shuts down) for this run."""
    import ray
    from verl.trainer.main_ppo import run_ppo

    if ray.is_initialized():
        _require_setup_hook()
        before = _live_placement_groups()
        try:
            run_ppo(config)
        finally:
            _remove_placement_groups(_live_placement_groups() - before)
        return
    owns_ray = init_ray(config)
    try:
        run_ppo(config)
    finally:
        if owns_ray:
            ray.shutdown()


def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {info["name"] for info in placement_group_table().values() if info["state"] != "REMOVED"}


def _remove_placement_groups(names: set[str]) -> None:
    """verl names its placement groups deterministically and leaves them behind; the next run in the same Ray
    session would fail to create them (or wait forever for the resources they hold)."""
    from ray.util import get_placement_group, remove_placement_group

    for name in names:
        remove_placement_group(get_placement_group(name))


@hydra.main(config_path="config", config_name="ppo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    try:
        run(config)
    except config_check.ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
