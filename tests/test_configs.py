"""The 30 experiment scripts compose offline into valid configs with the paper's settings, and the
validation rejects unknown keys and wrong values before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trainer_fixtures import REPO
from verl_tre.trainer import config_check, main_ppo
from verl_tre.runs.methods import detect_method

TASKS = {"math": 8192, "countdown": 512, "hh": 1024}  # task -> the paper's response length
SIZES = {"1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "7b": "Qwen/Qwen2.5-7B-Instruct"}
METHODS = {"": "ppo", "_forking_tokens": "forking_tokens", "_kl_cov": "kl_cov", "_tre_k": "tre_k", "_tre_p": "tre_p"}
SCRIPTS = [(t, s, m) for t in TASKS for s in SIZES for m in METHODS]


def script_args(path, *extra: str, env: dict | None = None) -> list[str]:
    """The Hydra overrides a script passes to the entry point (printed by common.sh instead of running)."""
    run_env = {**os.environ, "VERL_TRE_PRINT_ARGS": "1", **(env or {})}
    out = subprocess.run(["bash", str(path), *extra], env=run_env, capture_output=True, check=True, timeout=60)
    return out.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("task, size, suffix", SCRIPTS, ids=[f"{t}/{s}_ppo{m}" for t, s, m in SCRIPTS])
def test_every_script_composes_and_validates(task, size, suffix):
    path = REPO / "experiments" / task / f"{size}_ppo{suffix}.sh"
    config = main_ppo.compose_config(script_args(path))
    main_ppo.prepare(config, launching=False)  # raises on any invalid value
    actor = config.actor_rollout_ref.actor
    assert detect_method(actor) == METHODS[suffix]
    assert (config.verl_tre.task, config.verl_tre.model_size) == (task, size)
    assert config.actor_rollout_ref.model.path == SIZES[size] == config.critic.model.path
    assert config.data.max_response_length == TASKS[task]
    assert config.data.train_files == os.path.expanduser(f"~/data/{task}/train.parquet")
    # The paper's training setup, shared by all 30.
    assert (config.algorithm.adv_estimator, config.algorithm.gamma, config.algorithm.lam) == ("gae", 1.0, 1.0)
    assert (config.data.train_batch_size, config.actor_rollout_ref.rollout.n, actor.ppo_mini_batch_size) == (512, 8, 64)
    assert (actor.optim.lr, config.critic.optim.lr, config.critic.optim.lr_warmup_steps_ratio) == (1e-6, 1e-5, 0.05)
    assert not actor.use_kl_loss and not config.algorithm.use_kl_in_reward
    assert config.actor_rollout_ref.rollout.val_kwargs.top_p == 0.7
    expected_coeff = 0.001 if METHODS[suffix] in ("tre_k", "tre_p") else 0.0
    assert actor.entropy_coeff == expected_coeff
    assert actor.trust_region.top_k == 2 and actor.trust_region.top_p == 0.99
    if METHODS[suffix] == "kl_cov":
        assert (actor.policy_loss.kl_cov_ratio, actor.policy_loss.ppo_kl_coef) == (0.002, 1.0)


def test_entropy_baseline_and_environment():
    """The Entropy baseline is the PPO script with ENTROPY_COEFF > 0; paths come from the environment."""
    path = REPO / "experiments" / "math" / "7b_ppo.sh"
    args = script_args(path, "trainer.total_epochs=3",
                       env={"MODEL_PATH": "/m", "CRITIC_PATH": "/c", "DATA_DIR": "/d", "N_GPUS_PER_NODE": "4"})
    text = path.read_text().replace('ENTROPY_COEFF="${ENTROPY_COEFF:-0.0}"', 'ENTROPY_COEFF="${ENTROPY_COEFF:-0.002}"')
    assert text != path.read_text()  # the editable default line
    edited = REPO / "experiments" / "math" / ".edited_7b_ppo.sh"
    edited.write_text(text)
    try:
        entropy_args = script_args(edited)
    finally:
        edited.unlink()
    config = main_ppo.compose_config(args)
    assert (config.actor_rollout_ref.model.path, config.critic.model.path) == ("/m", "/c")
    assert config.data.val_files == "/d/test.parquet" and config.trainer.n_gpus_per_node == 4
    assert config.trainer.total_epochs == 3  # "$@" passes through, last wins
    entropy = main_ppo.compose_config(entropy_args)
    assert detect_method(entropy.actor_rollout_ref.actor) == "entropy"
    assert entropy.actor_rollout_ref.actor.entropy_coeff == 0.002


def test_dry_run_through_a_script_prints_the_validated_config():
    env = {**os.environ, "PYTHON": sys.executable, "REWARD_SERVER_URL": "http://127.0.0.1:9/predict"}
    out = subprocess.run(["bash", str(REPO / "experiments/hh/7b_ppo_tre_p.sh"), "verl_tre.dry_run=true"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    config = OmegaConf.create(out.stdout[out.stdout.index("data:"):])
    assert config.verl_tre.dry_run is True and config.verl_tre.task == "hh"
    assert config.actor_rollout_ref.actor.trust_region.mode == "top_p"
    assert config.custom_reward_function.path.endswith("verl_tre/utils/reward_score/__init__.py")


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="trust_regoin"):
        main_ppo.compose_config(["actor_rollout_ref.actor.trust_regoin.mode=top_k"])


BAD_VALUES = [
    ("actor_rollout_ref.actor.trust_region.top_k=0", "top_k"),
    ("actor_rollout_ref.actor.trust_region.mode=top_q", "mode"),
    ("method=tre_p actor_rollout_ref.actor.trust_region.top_p=1.5", "top_p"),
    ("actor_rollout_ref.actor.forking_tokens.scope=global", "scope"),
    ("actor_rollout_ref.actor.entropy_coeff=-0.1", "entropy_coeff"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=kl_cvo", "loss_mode"),
    ("actor_rollout_ref.rollout.top_p=0", "rollout.top_p"),
    ("actor_rollout_ref.rollout.temperature=0", "rollout.temperature"),
    ("actor_rollout_ref.rollout.name=vllmm", "rollout.name"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=3", "tensor_model_parallel_size"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=1024", "ppo_mini_batch_size"),
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=100", "ppo_max_token_len_per_gpu"),
    ("actor_rollout_ref.actor.optim.lr=0", "optim.lr"),
    ("critic.optim.lr_warmup_steps_ratio=2", "lr_warmup_steps_ratio"),
    ("algorithm.gamma=1.5", "gamma"),
    ("algorithm.adv_estimator=grop", "adv_estimator"),
    ("data.max_response_length=0", "max_response_length"),
    ("data.train_batch_size=abc", "train_batch_size"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.logger=[console,wandbb]", "wandbb"),
    ("trainer.resume_mode=resume_path", "resume_from_path"),
    ("trainer.save_freq=0", "save_freq"),
    ("reward_model.reward_manager=nope", "reward_manager"),
    ("verl_tre.task=gsm8k", "verl_tre.task"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_invalid_values_are_rejected(override, key):
    config = main_ppo.compose_config(["method=tre_k", *override.split()])
    with pytest.raises(config_check.ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        main_ppo.prepare(config, launching=False)


def test_group_estimator_needs_several_rollouts_and_all_problems_are_listed():
    config = main_ppo.compose_config(["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=1",
                                      "algorithm.lam=-1"])
    with pytest.raises(config_check.ConfigError) as err:
        main_ppo.prepare(config, launching=False)
    message = str(err.value)
    assert "2 problem(s)" in message and "rollout.n" in message and "algorithm.lam" in message


def test_launch_checks_data_files_and_device(tmp_path):
    missing = tmp_path / "nope.parquet"
    config = main_ppo.compose_config([f"data.train_files={missing}", "trainer.device=cuda"])
    with pytest.raises(config_check.ConfigError) as err:
        main_ppo.prepare(config, launching=True)
    assert str(missing) in str(err.value)
    import torch

    if not torch.cuda.is_available():
        assert "trainer.device=cpu" in str(err.value)
