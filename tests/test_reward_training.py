"""Reward model training (TRL RewardTrainer) on CPU with a tiny model, then serving what it saved."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("trl")

from verl_tre.reward_server.background import free_port, serve_in_background  # noqa: E402
from verl_tre.reward_server.settings import ServerSettings  # noqa: E402
from verl_tre.reward_server.tiny import build_tiny_reward_model  # noqa: E402

REWARD_DIR = Path(__file__).resolve().parents[1] / "experiments/hh/reward"
TOPICS = ["cooking", "gardening", "taxes", "chess", "python", "history", "music", "travel", "physics", "cats"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_reward_model", REWARD_DIR / "train_reward_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Prompt/chosen/rejected rows where the chosen answer helps and the rejected one refuses."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        filler = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(1, 6)))
        rows.append({"prompt": f"Tell me about {topic}.",
                     "chosen": f"Sure, here is a helpful overview of {topic}: {filler}.",
                     "rejected": f"No. I will not talk about {topic}. {filler}."})
    return rows


def margins(model_dir: Path, rows: list[dict]) -> torch.Tensor:
    """reward(chosen) - reward(rejected) by transformers' own forward, one pair at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def reward(prompt, response):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}], return_tensors="pt")
        with torch.inference_mode():
            return model(input_ids=ids).logits[0, 0].item()

    return torch.tensor([reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in rows])


def test_presets_follow_the_paper(script):
    for preset, model in (("1.5b", "Qwen/Qwen2.5-1.5B-Instruct"), ("7b", "Qwen/Qwen2.5-7B-Instruct")):
        args = script.parse_args(["--preset", preset])
        settings = script.training_settings(args)
        assert args.model == model
        assert (settings["num_train_epochs"], settings["learning_rate"], settings["warmup_ratio"]) == (3, 1e-5, 0.1)
        assert settings["center_rewards_coefficient"] == 0.01 and settings["bf16"]
        assert settings["eval_strategy"] == "epoch"  # evaluates on the hub's test split
    # Every setting is one RewardConfig accepts (bf16 aside: it needs a GPU to construct).
    from trl import RewardConfig

    config = RewardConfig(**{**script.training_settings(script.parse_args(["--preset", "7b"])), "bf16": False})
    assert config.gradient_accumulation_steps * config.per_device_train_batch_size * 8 == 64


def test_launch_configs_are_valid_accelerate_files():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launch_options = {a.dest for a in launch_command_parser()._actions}
    zero3 = ClusterConfig.from_yaml_file(str(REWARD_DIR / "deepspeed_config_zero3.yaml"))
    assert zero3.distributed_type.value == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True  # one checkpoint the server can load
    assert set(zero3.deepspeed_config) <= launch_options
    ddp = ClusterConfig.from_yaml_file(str(REWARD_DIR / "accelerate_multi_gpu.yaml"))
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.mixed_precision == "bf16"


def test_bad_data_is_refused_before_training(script, tmp_path):
    with pytest.raises(SystemExit):
        script.parse_args(["--train-file", str(tmp_path / "missing.jsonl")])
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"chosen": "good", "rejected": "bad"}) + "\n")
    with pytest.raises(ValueError, match="no string 'prompt' column"):
        script.load_preferences(script.parse_args(["--train-file", str(plain)]))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
        script.load_preferences(script.parse_args(["--train-file", str(wrong)]))


def ultrafeedback_rows(pairs: list[dict], reply_only: bool = False) -> list[dict]:
    """``pairs`` in HuggingFaceH4/ultrafeedback_binarized's layout: a string prompt beside chosen/rejected
    conversations that repeat it (``reply_only``: the assistant turn alone), plus columns training ignores."""
    rows = []
    for i, pair in enumerate(pairs):
        user = [] if reply_only else [{"role": "user", "content": pair["prompt"]}]
        chosen = user + [{"role": "assistant", "content": pair["chosen"]}]
        rows.append({"prompt": pair["prompt"], "prompt_id": f"id{i}", "chosen": chosen, "messages": chosen,
                     "rejected": user + [{"role": "assistant", "content": pair["rejected"]}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


@pytest.mark.parametrize("reply_only", [False, True])
def test_a_prompt_beside_message_lists_is_folded_into_whole_conversations(script, reply_only):
    from datasets import Dataset

    pairs = preference_pairs(3, seed=2)
    converted = script.to_conversations(Dataset.from_list(ultrafeedback_rows(pairs, reply_only)), "uf")
    assert sorted(converted.column_names) == ["chosen", "rejected"]
    for row, pair in zip(converted, pairs):
        for side in ("chosen", "rejected"):
            assert row[side] == [{"role": "user", "content": pair["prompt"]},
                                 {"role": "assistant", "content": pair[side]}]


@pytest.mark.slow
def test_training_runs_on_the_ultrafeedback_layout(script, tmp_path):
    """The layout TRL failed on ('list' object has no attribute 'endswith'): two optimizer steps from a parquet."""
    import pandas as pd

    base = build_tiny_reward_model(tmp_path / "base", hidden_size=16, num_layers=1)
    data = tmp_path / "uf.parquet"
    pd.DataFrame(ultrafeedback_rows(preference_pairs(8, seed=3))).to_parquet(data)
    final = script.main(["--model", str(base), "--train-file", str(data), "--output-dir", str(tmp_path / "run"),
                         "--no-bf16", "--no-gradient-checkpointing", "--max-steps", "2", "--per-device-batch-size",
                         "4", "--grad-accum", "1", "--save-strategy", "no", "--logging-steps", "1"])
    summary = json.loads((final / "reward_training.json").read_text())
    assert summary["pairs"] == 8 and summary["metrics"]["train"]["train_loss"] > 0


@pytest.mark.slow
def test_tiny_training_learns_the_preference_and_the_server_serves_it(script, tmp_path):
    base = build_tiny_reward_model(tmp_path / "base", hidden_size=32, num_layers=2)
    train_file = tmp_path / "prefs.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in preference_pairs(96, seed=0)))
    held_out = preference_pairs(24, seed=1)
    before = margins(base, held_out)

    final = script.main([
        "--model", str(base), "--train-file", str(train_file), "--output-dir", str(tmp_path / "run"),
        "--no-bf16", "--no-gradient-checkpointing", "--epochs", "2", "--lr", "3e-3",
        "--per-device-batch-size", "8", "--grad-accum", "1", "--save-strategy", "no", "--logging-steps", "4",
    ])

    assert final == tmp_path / "run/model" and not (tmp_path / "run/.model.partial").exists()
    summary = json.loads((final / "reward_training.json").read_text())
    assert summary["pairs"] == 96 and summary["metrics"]["train"]["train_loss"] < 0.69  # below chance (log 2)
    after = margins(final, held_out)
    assert (after > 0).float().mean() >= 0.9
    assert after.mean() > before.mean() + 0.5

    # The server loads what training saved and scores like transformers does.
    settings = ServerSettings(model_path=final, port=free_port())
    with serve_in_background(settings) as url:
        rows = held_out[:6]
        response = httpx.post(f"{url}/predict", timeout=60, json={
            "prompts": [r["prompt"] for r in rows] * 2,
            "responses": [r["chosen"] for r in rows] + [r["rejected"] for r in rows]})
        assert response.status_code == 200, response.text
        rewards = torch.tensor(response.json()["rewards"])
    assert torch.allclose(rewards[:6] - rewards[6:], after[:6], atol=1e-4)
