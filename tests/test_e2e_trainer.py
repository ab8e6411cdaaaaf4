"""verl's RayPPOTrainer end to end on CPU through our entry point, plus the run-record plumbing it relies on.

Slow tests: every method with GRPO (PPO and the entropy bonus: tests/test_e2e_runs.py), and TRE-K with GAE and
a critic on two worker processes, two steps each, checked through the run records (metrics.jsonl, run.json); the
GAE run saves a checkpoint and a second run resumes from it. One GRPO step of a tiny Llama converted from a GGUF
(the real-LM path: gguf_to_hf, its end-of-turn eos, the HF rollout stopping there). All runs share one Ray
start-up; the fixture tears Ray down even when a test fails.
"""

from __future__ import annotations

import json
import math

import pytest

from trainer_fixtures import MAX_WORKERS, REGION_METRICS, cpu_overrides
from verl_tre.runs import identity, methods, record

# method -> (overrides, metrics beyond the region metrics that must be logged). Elsewhere through the trainer:
# PPO and the entropy bonus in test_e2e_runs.py (same region metrics), TRE-K in the GAE run below, TRE-K and TRE-P
# (padded forward) with the fused lm head in test_fused_trainer.py, which also checks update_policy of every method
# on both forwards. These run verl's remove-padding forward (the default, as on GPUs).
METHODS = {
    "forking_tokens": (["method=forking_tokens"], ("actor/forking_threshold", "actor/forking_kept_frac")),
    "kl_cov": (["method=kl_cov"], ("actor/kl_cov_tokens",)),
    "tre_p": (["method=tre_p", "actor_rollout_ref.actor.entropy_coeff=0.01"], ()),
}


def _train(overrides: list[str]) -> None:
    from verl_tre.trainer import main_ppo

    main_ppo.run(main_ppo.compose_config(overrides))


def _records(run_dir) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / record.RUN_FILE).read_text())
    lines = [json.loads(line) for line in (run_dir / record.METRICS_FILE).read_text().splitlines()]
    return summary, lines


def _assert_finite(step: dict, names) -> None:
    missing = [n for n in names if n not in step["metrics"]]
    assert not missing, f"step {step['step']} lacks {missing}"
    bad = {n: step["metrics"][n] for n in names if not math.isfinite(step["metrics"][n])}
    assert not bad, f"step {step['step']} has non-finite {bad}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", list(METHODS))
def test_grpo_every_method(method, ray_session, tiny_assets, tmp_path):
    overrides, extra = METHODS[method]
    run_dir = tmp_path / "run"
    _train(cpu_overrides(tiny_assets, run_dir) + overrides + ["algorithm.adv_estimator=grpo"])
    summary, steps = _records(run_dir)
    assert summary["method"] == method.split("-")[0] and summary["task"] == "countdown"
    assert summary["config"]["actor_rollout_ref"]["rollout"]["name"] == "hf"  # CPU mode applied
    assert summary["config"]["actor_rollout_ref"]["model"]["use_remove_padding"] is True
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        _assert_finite(step, REGION_METRICS + extra + ("actor/pg_loss", "critic/score/mean"))
    if method == "tre_p":
        assert steps[0]["metrics"]["actor/regularizer/region_size"] >= 1  # the nucleus holds at least the top token


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gae_critic_two_workers_checkpoint_and_resume(ray_session, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    base = cpu_overrides(tiny_assets, run_dir, workers=2) + [
        "method=tre_k", "algorithm.adv_estimator=gae", "trainer.save_freq=2", "trainer.test_freq=2"]
    _train(base)
    summary, steps = _records(run_dir)
    assert summary["method"] == "tre_k"
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        _assert_finite(step, REGION_METRICS + ("critic/vf_loss", "critic/values/mean", "actor/pg_loss"))
        assert step["metrics"]["actor/regularizer/region_size"] == 2  # TRE-K with K = 2 keeps exactly two tokens
    assert any(k.startswith("val-core/countdown/") for k in steps[-1]["metrics"]), "validation not recorded"
    checkpoint = run_dir / "global_step_2"
    assert (checkpoint / "actor").is_dir() and (checkpoint / "critic").is_dir()
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    # The same configuration, longer (the run length is not part of its identity), resumes into its directory.
    _train(base + ["trainer.total_training_steps=3", "trainer.resume_mode=auto"])
    _, steps = _records(run_dir)
    # The second run starts from the saved step 2 and trains only step 3.
    assert [s["step"] for s in steps] == [1, 2, 3]
    _assert_finite(steps[-1], REGION_METRICS + ("critic/vf_loss",))


def _gguf_llama(root) -> dict:
    """Arithmetic parquet and a tiny Llama that always ends its turn, through a GGUF whose eos opens a turn."""
    import pandas as pd

    from tiny_gguf import end_of_turn_model, write_llama_gguf
    from verl_tre.data.arithmetic_task import write_arithmetic_splits
    from verl_tre.models import gguf_to_hf
    from verl_tre.utils import local_assets

    data = write_arithmetic_splits(root / "data", num_test=4, max_operand=5)
    texts = [row["prompt"][0]["content"] for row in pd.read_parquet(data["train"]).to_dict("records")]
    tokenizer = local_assets.train_bpe_tokenizer((texts + ["user\n", "assistant\n"]) * 4, root / "tokenizer",
                                                 vocab_size=300)
    gguf = write_llama_gguf(end_of_turn_model(tokenizer), tokenizer, root / "tiny.gguf",
                            eos_token=local_assets.IM_START)
    model, _ = gguf_to_hf.convert(gguf, root / "model")
    return {"train": data["train"], "test": data["test"], "model": model}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_llama_from_gguf_stops_at_the_end_of_turn(ray_session, tmp_path):
    import os

    import ray

    assets = _gguf_llama(tmp_path)
    run_dir = tmp_path / "run"
    _train(["task=arithmetic"] + cpu_overrides(assets, run_dir, steps=1) + ["algorithm.adv_estimator=grpo"])
    summary, steps = _records(run_dir)
    assert summary["task"] == "arithmetic" and summary["model"] == str(assets["model"])
    assert [s["step"] for s in steps] == [1]
    metrics = steps[0]["metrics"]
    # Every response is the single <|im_end|>: the rollout stopped at the chat template's end of turn.
    assert metrics["response_length/mean"] == 1 and metrics["response_length/clip_ratio"] == 0
    _assert_finite(steps[0], REGION_METRICS + ("actor/pg_loss",))
    assert metrics["actor/ref/top1_prob"] > 0.999

    # The threads CPU mode gives the workers: an actor made as verl makes its workers (no num_cpus, the job's
    # runtime environment) computes on them, where Ray alone would force one thread.
    class ThreadProbe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    given = int(ray.get_runtime_context().runtime_env["env_vars"]["OMP_NUM_THREADS"])
    assert ray.get(ray.remote(ThreadProbe).remote().threads.remote()) == given
    if "OMP_NUM_THREADS" not in os.environ:  # set, it is the user's choice and passed on as it is
        assert given == max(1, (os.cpu_count() or 1) // MAX_WORKERS)  # the cores shared among the session's workers


# Fast tests of the run-record plumbing (no trainer).

@pytest.mark.parametrize("actor, method", [
    ({"entropy_coeff": 0.0}, "ppo"),
    ({"entropy_coeff": 0.001, "trust_region": {"mode": "full"}}, "entropy"),
    ({"entropy_coeff": 0.001, "trust_region": {"mode": "top_k"}}, "tre_k"),
    ({"entropy_coeff": 0.001, "trust_region": {"mode": "top_p"}}, "tre_p"),
    ({"entropy_coeff": 0.0, "trust_region": {"mode": "top_k"}}, "ppo"),
    ({"entropy_coeff": 0.0, "forking_tokens": {"enable": True}}, "forking_tokens"),
    ({"entropy_coeff": 0.0, "policy_loss": {"loss_mode": "clipped_kl_cov"}}, "kl_cov"),
    ({"entropy_coeff": 0.0, "policy_loss": {"loss_mode": "vanilla"}}, "ppo"),
])
def test_detect_method(actor, method):
    assert methods.detect_method(actor) == method


def test_tracking_writes_run_record(tmp_path):
    import numpy as np
    import torch
    from verl.utils import tracking

    record.install()
    record.install()  # idempotent: one record per log call, not two
    config = {"verl_tre": {"task": "hh", "model_size": "7b"}, "trainer": {"default_local_dir": str(tmp_path / "r")},
              "actor_rollout_ref": {"model": {"path": "m"}, "actor": {"entropy_coeff": 0.001,
                                                                       "trust_region": {"mode": "top_p"}}}}
    logger = tracking.Tracking("p", "e", default_backend=[], config=config)
    logger.log({"a": 1, "b": np.float32(0.5), "c": torch.tensor(2.0), "text": "skipped", "nan": float("nan")}, step=0)
    logger.log({"a": 2}, step=1)
    summary, lines = _records(tmp_path / "r")
    assert summary == {"task": "hh", "model": "m", "model_size": "7b", "method": "tre_p", "config": config,
                       **identity.summary_fields(config)}
    assert summary["method_options"] == {"top_p": None, "entropy_coeff": 0.001}
    assert [line["step"] for line in lines] == [0, 1]
    assert lines[0]["metrics"]["a"] == 1.0 and lines[0]["metrics"]["b"] == 0.5 and lines[0]["metrics"]["c"] == 2.0
    assert "text" not in lines[0]["metrics"] and math.isnan(lines[0]["metrics"]["nan"])
    assert all(isinstance(line["time"], float) for line in lines)


def test_local_assets_load_as_policy_and_critic(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from verl_tre.utils import local_assets

    qwen = local_assets.qwen25_tokenizer(tmp_path / "qwen")
    text = qwen.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.eos_token == "<|im_end|>" and qwen.pad_token_id == 151643 and len(qwen) >= 151665

    tok = local_assets.train_bpe_tokenizer(["Using the numbers [12, 7]."] * 20, tmp_path / "tok", vocab_size=300,
                                           compact=True)
    ids = tok("Using the numbers [12, 7].")["input_ids"]
    assert tok.decode(ids) == "Using the numbers [12, 7]."
    assert "1" in tok.convert_ids_to_tokens(ids) and "2" in tok.convert_ids_to_tokens(ids)  # one token per digit
    model_dir = local_assets.tiny_qwen2(tmp_path / "m", tok, hidden_size=16, num_layers=1, num_heads=2,
                                        num_kv_heads=1, intermediate_size=32)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    assert policy.config.vocab_size >= len(tok) and policy.config.eos_token_id == tok.eos_token_id
    critic = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1)
    assert critic(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), 1)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == local_assets.COMPACT_CHAT_TEMPLATE
