"""What the launch refuses in one line before Ray starts, beyond bad values (tests/test_configs.py): a model
folder without weights or tokenizer, a logger backend that is not installed, a key added with Hydra's ``+``
that nothing reads."""

from __future__ import annotations

import pytest

from verl_tre.trainer import config_check, main_ppo


@pytest.fixture
def launch_dir(tmp_path, monkeypatch):
    """A launch directory with (empty) data files, so that only the checks under test can complain."""
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        (tmp_path / f"{split}.parquet").write_bytes(b"")
    return tmp_path


def _launch_problems(launch_dir, *overrides: str) -> str:
    config = main_ppo.compose_config([
        "trainer.device=cpu", "algorithm.adv_estimator=grpo", f"data.train_files={launch_dir / 'train.parquet'}",
        f"data.val_files={launch_dir / 'test.parquet'}", *overrides])
    try:
        main_ppo.prepare(config, launching=True)
    except config_check.ConfigError as err:
        return str(err)
    return ""


def _model_folder(path, *files: str):
    path.mkdir()
    for name in files:
        (path / name).write_text("{}")
    return path


def test_a_model_folder_needs_weights_and_a_tokenizer(launch_dir):
    bare = _model_folder(launch_dir / "bare", "config.json")
    message = _launch_problems(launch_dir, f"actor_rollout_ref.model.path={bare}")
    assert "1 problem(s)" in message and "actor_rollout_ref.model.path" in message, message
    assert "holds no weights (model.safetensors" in message and "and no tokenizer (tokenizer.json" in message

    sharded = _model_folder(launch_dir / "sharded", "config.json", "model.safetensors.index.json",
                            "tokenizer_config.json")
    assert _launch_problems(launch_dir, f"actor_rollout_ref.model.path={sharded}") == ""

    # The critic needs weights too; its tokenizer comes from the actor's folder.
    no_weights = _model_folder(launch_dir / "critic", "config.json", "tokenizer.json")
    message = _launch_problems(launch_dir, f"actor_rollout_ref.model.path={sharded}", "algorithm.adv_estimator=gae",
                               f"critic.model.path={no_weights}")
    assert "critic.model.path" in message and "no weights" in message and "tokenizer" not in message


def test_a_logger_backend_that_is_not_installed_is_refused_at_launch(launch_dir, monkeypatch):
    model = _model_folder(launch_dir / "m", "config.json", "model.safetensors", "tokenizer.json")
    monkeypatch.setattr(config_check, "installed", lambda module: module != "mlflow")
    message = _launch_problems(launch_dir, f"actor_rollout_ref.model.path={model}", "trainer.logger=[console,mlflow]")
    assert "trainer.logger" in message and "pip install mlflow" in message and "1 problem(s)" in message
    assert _launch_problems(launch_dir, f"actor_rollout_ref.model.path={model}", "trainer.logger=[console,wandb]") == ""
    # A dry run (another machine's packages may differ) leaves it to the launch.
    config = main_ppo.compose_config(["trainer.logger=[console,mlflow]"])
    main_ppo.prepare(config, launching=False)


@pytest.mark.parametrize("override, suggestion", [
    ("+actor_rollout_ref.actor.trust_regoin.mode=top_k", "actor_rollout_ref.actor.trust_region"),
    ("+actor_rollout_ref.actor.entropy_coef=0.01", "actor_rollout_ref.actor.entropy_coeff"),
    ("+trainer.total_epoch=3", "trainer.total_epochs"),
    ("+verl_tre.sed=3", "verl_tre.seed"),
])
def test_a_key_added_with_plus_that_nothing_reads_is_refused(override, suggestion):
    config = main_ppo.compose_config(["method=tre_k", override])
    with pytest.raises(config_check.ConfigError, match=rf"did you mean {suggestion.replace('.', r'[.]')}\?"):
        main_ppo.prepare(config, launching=False)


@pytest.mark.parametrize("overrides", [
    ["+actor_rollout_ref.model.override_config.attention_dropout=0.1"],  # passed to the model's config
    ["+critic.model.override_config.attention_dropout=0.1"],
    ["task=math", "+reward_model.reward_kwargs.math_verify=true"],  # passed to the reward function
    ["+data.dataloader_num_workers=2"],  # read by verl with config.data.get(...)
    ["trainer.device=cpu"],  # the keys CPU mode adds
])
def test_keys_added_where_they_are_read_are_taken(overrides):
    config = main_ppo.compose_config(["method=tre_k", *overrides])
    main_ppo.prepare(config, launching=False)
