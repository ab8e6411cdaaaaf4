"""A run's identity: its name, its hash and its directory.

Two launches are the same experiment when their *training configuration* is equal: the resolved trainer config
without the keys that only say where files go, what is logged, how often it is saved or evaluated, how long the
run lasts and how the hardware is used (``RESUMABLE_KEYS``). Everything else - task, model path, method and each
of its options, seed, learning rate, batch sizes, data files, any override - is part of the identity.

* ``trainer.experiment_name: auto`` (the default) names the run
  ``<task>_<size>_<method><options>_s<seed>_<hash>``, e.g. ``countdown_1.5b_tre_k_k2_ec0.001_s1_3f2a9c1e``,
  where the hash covers the whole training configuration; ``trainer.default_local_dir`` (verl's
  ``checkpoints/<project>/<experiment_name>``, relative to the launch directory) follows from it. So runs that
  differ in anything that matters never share a directory, however the difference was made.
* ``summary_fields`` is what run.json records beside the full config: name, seed, seed group (the hash without
  the seed: runs that differ only in the seed), config hash and the method's options.

Whether a launch may write into a directory that already holds a run: verl_tre.runs.resume.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from verl_tre.runs.methods import detect_method, method_options

AUTO = "auto"
RESUME_ANYWAY_KEY = "verl_tre.resume_anyway"
SEED_KEY = "verl_tre.seed"
# The places verl reads a seed from; config_check requires them to follow verl_tre.seed.
SEED_TARGETS = ("data.seed", "actor_rollout_ref.rollout.seed", "critic.seed")

# Keys (fnmatch patterns over dotted paths) that a resumed run may change: where files go, logging, the save and
# evaluation cadence, the run's length, and how work is laid out on the hardware (offload, micro-batches, memory).
RESUMABLE_KEYS = (
    "trainer.project_name", "trainer.experiment_name", "trainer.default_local_dir", "trainer.default_hdfs_dir",
    "trainer.resume_mode", "trainer.resume_from_path", "trainer.del_local_ckpt_after_load",
    "trainer.total_epochs", "trainer.total_training_steps", "trainer.save_freq", "trainer.test_freq",
    "trainer.val_before_train", "trainer.val_only", "trainer.logger", "trainer.log_val_generations",
    "trainer.rollout_data_dir", "trainer.validation_data_dir", "trainer.max_actor_ckpt_to_keep",
    "trainer.max_critic_ckpt_to_keep", "trainer.ray_wait_register_center_timeout", "trainer.profile_steps",
    "trainer.controller_nsight_options.*", "trainer.worker_nsight_options.*", "trainer.timeline_json_file",
    "*.optim.total_training_steps",  # verl writes the run's length there when the trainer starts
    "*.trust_region.metrics", "*.trust_region.reference_top_k", "*.trust_region.reference_top_p",  # logging only
    "ray_init.*", "verl_tre.dry_run", "verl_tre.run_record", RESUME_ANYWAY_KEY,
    "*.profiler.*", "*.checkpoint.*", "*.fsdp_config.param_offload", "*.fsdp_config.optimizer_offload",
    "*.fsdp_config.offload_policy", "*micro_batch_size*", "*max_token_len*", "*.gpu_memory_utilization",
    "*.enable_gradient_checkpointing", "data.filter_overlong_prompts_workers", "data.use_shm",
)
SEED_KEYS = (SEED_KEY, *SEED_TARGETS)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested dicts; lists are leaves."""
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _is_resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def _portable(key: str, value: Any) -> Any:
    """The project's own reward module is recorded as a module name, so clones in other folders agree."""
    if key == "custom_reward_function.path" and isinstance(value, str) and value.endswith(
        os.path.join("verl_tre", "utils", "reward_score", "__init__.py")
    ):
        return "verl_tre.utils.reward_score"
    return value


def training_config(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """{dotted key: value} of everything in a resolved config that makes it a different experiment."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return {k: _portable(k, v) for k, v in sorted(flatten(config).items()) if not _is_resumable(k)}


def _digest(flat: Mapping[str, Any]) -> str:
    text = json.dumps(flat, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def config_hash(config) -> str:
    """8 hex digits of the training configuration (seed included)."""
    return _digest(training_config(config))


def seed_group(config) -> str:
    """8 hex digits of the training configuration without the seed: equal for runs that differ only in it."""
    return _digest({k: v for k, v in training_config(config).items() if k not in SEED_KEYS})


def lookup(config: Mapping[str, Any], dotted: str, default=None):
    """The value at a dotted key of a nested config (plain containers or DictConfig), or ``default``."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


_SHORT = {"top_k": "k", "top_p": "p", "max_size": "cap", "top_ratio": "r", "kl_cov_ratio": "kc",
          "ppo_kl_coef": "kl", "entropy_coeff": "ec"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def run_name(config: Mapping[str, Any]) -> str:
    """``<task>_<size>_<method><options>_s<seed>_<hash>`` for a resolved config (plain containers)."""
    actor = lookup(config, "actor_rollout_ref.actor", {})
    size = lookup(config, "verl_tre.model_size") or Path(str(lookup(config, "actor_rollout_ref.model.path", "model"))).name
    parts = [lookup(config, "verl_tre.task") or "custom", size, detect_method(actor)]
    for key, value in method_options(actor).items():
        if key == "loss_mode":
            continue
        parts.append(f"{_SHORT.get(key, key)}{value}" if value is not False else f"no{key}")
    parts += [f"s{lookup(config, SEED_KEY)}", config_hash(config)]
    return "_".join(_slug(str(p)) for p in parts)


def assign(config: DictConfig) -> str:
    """Names the run in place when ``trainer.experiment_name`` is ``auto`` (before the config is resolved, so
    verl's default_local_dir interpolation follows); returns the experiment name."""
    if config.trainer.experiment_name != AUTO:
        return str(config.trainer.experiment_name)
    resolved = copy.deepcopy(config)
    resolved.trainer.experiment_name = "_"  # excluded from the hash; any value resolves
    name = run_name(OmegaConf.to_container(resolved, resolve=True))
    config.trainer.experiment_name = name
    return name


def summary_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """run.json's identity fields for a resolved config (plain containers)."""
    return {
        "name": lookup(config, "trainer.experiment_name"),
        "seed": lookup(config, SEED_KEY),
        "seed_group": seed_group(config),
        "config_hash": config_hash(config),
        "method_options": method_options(lookup(config, "actor_rollout_ref.actor", {})),
    }


def run_dir(config: Mapping[str, Any] | DictConfig) -> Path:
    """The run's directory as verl resolves it: trainer.default_local_dir, relative to the launch directory."""
    return Path(os.path.abspath(os.path.expanduser(str(lookup(config, "trainer.default_local_dir")))))
