"""Run identity: names and directories follow from the training configuration, resumes are checked against the
recorded run before Ray starts, seeds are one option, scripts take their values from the environment, and bad
model paths stop the launch at once. Fast: no trainer runs (those are in test_e2e_runs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from test_configs import script_args
from trainer_fixtures import REPO, cpu_overrides, tiny_assets  # noqa: F401  (fixture)
from verl_tre import plugin
from verl_tre.runs import identity, methods, record, resume
from verl_tre.trainer import config_check, main_ppo, sweep


def _prepared(overrides, launching=False):
    """The config a launch with ``overrides`` trains; ``launching``: also what it would do with its directory."""
    config = main_ppo.compose_config(["trainer.device=cpu", *overrides])
    main_ppo.prepare(config, launching=launching)
    if launching:
        resume.decide(config)
    return config


def _auto_overrides(assets, *extra):
    """A tiny CPU run whose name and directory are left to verl_tre.runs.identity (no default_local_dir override)."""
    return [o for o in cpu_overrides(assets, "unused") if not o.startswith("trainer.default_local_dir")] + list(extra)


def test_every_training_difference_gets_its_own_name():
    base = _prepared(["method=ppo"])
    variants = {
        "entropy": ["method=ppo", "actor_rollout_ref.actor.entropy_coeff=0.01"],
        "tre_k": ["method=tre_k"],
        "tre_k K=4": ["method=tre_k", "actor_rollout_ref.actor.trust_region.top_k=4"],
        "tre_p cap": ["method=tre_p", "actor_rollout_ref.actor.trust_region.max_size=256"],
        "seed": ["method=ppo", "verl_tre.seed=2"],
        "lr": ["method=ppo", "actor_rollout_ref.actor.optim.lr=2e-6"],
        "model": ["method=ppo", "actor_rollout_ref.model.path=/models/other"],
        "forking scope": ["method=forking_tokens", "actor_rollout_ref.actor.forking_tokens.scope=mini_batch"],
    }
    names = {"ppo": base.trainer.experiment_name}
    for label, overrides in variants.items():
        config = _prepared(overrides)
        names[label] = config.trainer.experiment_name
        assert config.trainer.default_local_dir == os.path.abspath(f"checkpoints/verl_tre/{names[label]}")
    assert len(set(names.values())) == len(names), names
    assert names["tre_k K=4"].startswith("countdown_1.5b_tre_k_k4_ec0.001_s1_")
    assert names["tre_p cap"].startswith("countdown_1.5b_tre_p_p0.99_cap256_ec0.001_s1_")
    assert names["entropy"].startswith("countdown_1.5b_entropy_ec0.01_s1_")
    assert names["seed"].startswith("countdown_1.5b_ppo_s2_")
    # Keys that only change the run's length, cadence, logging or memory layout keep the name.
    same = _prepared(["method=ppo", "trainer.total_epochs=99", "trainer.save_freq=7", "trainer.logger=[console]",
                      "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "trainer.project_name=other",
                      "trainer.total_training_steps=1"])
    assert same.trainer.experiment_name == names["ppo"]


def test_seed_group_and_summary_fields():
    one, two = (OmegaConf.to_container(_prepared(["method=tre_k", f"verl_tre.seed={s}"])) for s in (1, 2))
    a, b = identity.summary_fields(one), identity.summary_fields(two)
    assert (a["seed"], b["seed"]) == (1, 2)
    assert a["seed_group"] == b["seed_group"] and a["config_hash"] != b["config_hash"]
    assert a["method_options"] == {"top_k": 2, "entropy_coeff": 0.001}
    assert a["name"] == one["trainer"]["experiment_name"] and a["config_hash"] in a["name"]
    # The seed reaches every place verl reads one.
    assert two["data"]["seed"] == two["actor_rollout_ref"]["rollout"]["seed"] == two["critic"]["seed"] == 2
    summary = record.run_summary(two)
    assert summary["seed"] == 2 and summary["seed_group"] == a["seed_group"] and summary["config"] == two


def test_seed_must_be_set_in_one_place():
    with pytest.raises(config_check.ConfigError, match=r"data\.seed=5.*set verl_tre\.seed=<seed>"):
        _prepared(["data.seed=5"])
    with pytest.raises(config_check.ConfigError, match=r"verl_tre\.seed=-1.*integer"):
        _prepared(["verl_tre.seed=-1"])


def test_worker_seeding_uses_seed_plus_rank():
    class FakeWorker:
        def __init__(self, seed, rank):
            self.config, self.rank = {"rollout": {"seed": seed}}, rank

        def init_model(self):
            return torch.rand(3)

    seeded = plugin._seeding_init_model(FakeWorker.init_model, lambda config: config["rollout"]["seed"])
    draws = [seeded(FakeWorker(seed, rank)) for seed, rank in ((1, 0), (1, 0), (1, 1), (2, 0))]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])


def test_scripts_take_values_from_the_environment():
    tre_k = REPO / "experiments" / "countdown" / "1.5b_ppo_tre_k.sh"
    env = {"ENTROPY_COEFF": "0.005", "K": "3"}
    run_env = {**os.environ, "VERL_TRE_PRINT_ARGS": "1", **env}
    out = subprocess.run(["bash", str(tre_k)], env=run_env, capture_output=True, text=True, check=True, timeout=60)
    assert "[verl_tre] countdown 1.5b tre_k: ENTROPY_COEFF=0.005 K=3" in out.stderr  # printed at launch
    config = main_ppo.compose_config(script_args(tre_k, env=env))
    main_ppo.prepare(config, launching=False)
    assert config.actor_rollout_ref.actor.entropy_coeff == 0.005 and config.actor_rollout_ref.actor.trust_region.top_k == 3
    assert config.trainer.experiment_name.startswith("countdown_1.5b_tre_k_k3_ec0.005_s1_")
    ppo = main_ppo.compose_config(script_args(REPO / "experiments" / "math" / "1.5b_ppo.sh",
                                              env={"ENTROPY_COEFF": "0.001"}))
    assert methods.detect_method(ppo.actor_rollout_ref.actor) == "entropy"
    tre_p = main_ppo.compose_config(script_args(REPO / "experiments" / "hh" / "7b_ppo_tre_p.sh", env={"P": "0.9"}))
    assert tre_p.actor_rollout_ref.actor.trust_region.top_p == 0.9


def _fake_previous_run(config, tmp_path, checkpoint=True):
    """A run directory as the trainer leaves it: run.json of ``config`` and, optionally, a checkpoint tracker."""
    directory = identity.run_dir(config)
    directory.mkdir(parents=True)
    recorded = OmegaConf.to_container(config)
    for role in (recorded["actor_rollout_ref"]["actor"], recorded["critic"]):
        role["optim"]["total_training_steps"] = 2  # verl's trainer writes the run's length there before recording
    (directory / "run.json").write_text(json.dumps(record.run_summary(recorded)))
    if checkpoint:
        (directory / "global_step_2" / "actor").mkdir(parents=True)
        (directory / "latest_checkpointed_iteration.txt").write_text("2")
    return directory


def test_resume_only_into_the_same_configuration(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _prepared(_auto_overrides(tiny_assets, "method=tre_k"), launching=True)
    directory = _fake_previous_run(first, tmp_path)
    # Same configuration, longer run: resumes.
    again = _prepared(_auto_overrides(tiny_assets, "method=tre_k", "trainer.total_training_steps=5"), launching=True)
    assert identity.run_dir(again) == directory
    # Another learning rate into the same directory (an explicit name): refused, with the difference and the ways out.
    pinned = [f"trainer.experiment_name={first.trainer.experiment_name}", "method=tre_k"]
    with pytest.raises(config_check.ConfigError) as err:
        _prepared(_auto_overrides(tiny_assets, *pinned, "actor_rollout_ref.actor.optim.lr=0.5"), launching=True)
    message = str(err.value)
    assert "actor_rollout_ref.actor.optim.lr: 0.001 -> 0.5" in message and "1 key(s)" in message
    assert "verl_tre.resume_anyway=true" in message and "trainer.experiment_name=auto" in message
    # The explicit way out.
    _prepared(_auto_overrides(tiny_assets, *pinned, "actor_rollout_ref.actor.optim.lr=0.5",
                              "verl_tre.resume_anyway=true"), launching=True)
    # A fresh start over an existing record would mix two runs' metrics.
    with pytest.raises(config_check.ConfigError, match="resume_mode=disable would start over"):
        _prepared(_auto_overrides(tiny_assets, "method=tre_k", "trainer.resume_mode=disable"), launching=True)


def test_checkpoints_without_a_record_are_not_resumed(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _prepared(_auto_overrides(tiny_assets), launching=True)
    directory = identity.run_dir(config)
    directory.mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(config_check.ConfigError, match="holds checkpoints but no run.json"):
        _prepared(_auto_overrides(tiny_assets), launching=True)


def test_model_paths_fail_before_ray(tiny_assets, tmp_path, monkeypatch):
    import huggingface_hub.constants

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(empty): r"holds no config.json",
        str(tmp_path / "missing"): r"is not a directory and not a hub id",
        "nobody-here/no-such-model-xyz": r"hub id nobody-here/no-such-model-xyz is not in the local Hugging Face "
                                         r"cache and the hub is offline",
    }
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for path, pattern in cases.items():
        overrides = _auto_overrides(tiny_assets, f"actor_rollout_ref.model.path={path}", f"critic.model.path={path}")
        with pytest.raises(config_check.ConfigError, match=rf"actor_rollout_ref\.model\.path=.*{pattern}"):
            _prepared(overrides, launching=True)
    # Online but unreachable: one clear line, quickly (a closed local port refuses the connection at once).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    overrides = _auto_overrides(tiny_assets, "actor_rollout_ref.model.path=nobody-here/no-such-model-xyz")
    with pytest.raises(config_check.ConfigError, match=r"the Hugging Face hub is unreachable .*local copy"):
        _prepared(overrides, launching=True)


def test_dry_run_leaves_nothing_in_the_working_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "verl_tre.trainer.main_ppo", "trainer.device=cpu",
                          "verl_tre.dry_run=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "experiment_name: countdown_1.5b_ppo_s1_" in out.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/, no log file


def test_sweep_plans_one_directory_per_combination(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scripts = [str(REPO / "experiments/countdown/1.5b_ppo.sh"), str(REPO / "experiments/countdown/1.5b_ppo_tre_k.sh")]
    assert sweep.main([*scripts, "--set", "ENTROPY_COEFF=0.001,0.01", "--seeds", "1,2", "--dry-run",
                       "--", "trainer.device=cpu"]) == 0
    out = capsys.readouterr().out
    dirs = [line.split("] ", 1)[1] for line in out.splitlines() if line.strip().startswith("[") and "/8]" in line]
    assert len(dirs) == len(set(dirs)) == 8
    assert all(d.startswith(str(tmp_path / "checkpoints" / "verl_tre")) for d in dirs)
    assert sum("_entropy_ec0.01_s2_" in d for d in dirs) == 1 and sum("_tre_k_k2_ec0.001_s1_" in d for d in dirs) == 1
    # A pinned name would put every combination in one directory: refused before anything runs.
    assert sweep.main([scripts[0], "--seeds", "1,2", "--dry-run", "--", "trainer.device=cpu",
                       "trainer.experiment_name=mine"]) == 2
    assert "would share" in capsys.readouterr().err


def test_hh_reward_options_in_yaml_are_the_clients_defaults():
    from verl_tre.utils.reward_score import RewardOptions

    kwargs = OmegaConf.to_container(_prepared(["task=hh"]).reward_model.reward_kwargs)
    assert kwargs == {name: RewardOptions.model_fields[name].default for name in kwargs}
    assert set(kwargs) == {name for name in RewardOptions.model_fields if name.startswith("hh_")}


def test_hh_launch_checks_the_reward_server_after_validation(tiny_assets, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REWARD_SERVER_URL", "http://127.0.0.1:9/predict")  # nothing listens there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a dead proxy must not matter for a local server
    with pytest.raises(config_check.ConfigError, match=r"HH reward server is not ready.*run_with_server\.sh"):
        main_ppo.run(main_ppo.compose_config(_auto_overrides(tiny_assets, "task=hh")))
    assert not ray.is_initialized()
    # An invalid value is reported first: the server check comes after validation.
    with pytest.raises(config_check.ConfigError, match=r"rollout\.n=0"):
        main_ppo.run(main_ppo.compose_config(_auto_overrides(tiny_assets, "task=hh", "actor_rollout_ref.rollout.n=0")))
