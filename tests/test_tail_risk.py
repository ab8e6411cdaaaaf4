"""The tail-risk study (experiments/tail_risk): task, tokenizer, policy, warm start, GRPO loop, report, resume."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not an installed package

from experiments.tail_risk import task  # noqa: E402
from experiments.tail_risk.policy import GRUPolicy, encode_prompts, sample  # noqa: E402
from experiments.tail_risk.report import permutation_p  # noqa: E402
from experiments.tail_risk.rl import Regularizer, RLConfig, train  # noqa: E402
from experiments.tail_risk.run import run_study  # noqa: E402
from experiments.tail_risk.sft import SFTConfig, widen  # noqa: E402
from experiments.tail_risk.study import VARIANTS, StudyConfig  # noqa: E402
from experiments.tail_risk.tokenizer import EOS, CharTokenizer  # noqa: E402

TRAIN, TEST = task.split(64)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TRAIN), st.sampled_from(sorted(task.HORIZONS)), st.integers(0, 10**6))
def test_demonstrations_score_one_and_corruptions_zero(inst, horizon, seed):
    hz = task.HORIZONS[horizon]
    text = task.demonstration(inst, hz, random.Random(seed))
    assert task.score(inst, text, True, hz) == 1.0
    assert task.score(inst, text, False, hz) == 0.0  # no <eos> in time
    think, answer = text.split("|")
    assert task.score(inst, think + "|" + answer + "+1", True, hz) == 0.0  # extra number
    assert task.score(inst, think + "?|" + answer, True, hz) == 0.0  # a never-valid token in the reasoning
    fewer = ";".join(think.split(";")[1:]) or "1+1=2,2+1=3;1+1=2,2+1=3"
    assert task.score(inst, fewer + "|" + answer, True, hz) == 0.0  # wrong number of reasoning blocks


def test_answer_checks_value_and_numbers():
    inst = task.Instance((3, 7, 9), 30)
    hz = task.HORIZONS["short"]
    block = "3*7=21,21+9=30"
    assert task.score(inst, f"{block}|(3*7)+9", True, hz) == 1.0
    assert task.score(inst, f"{block}|(9*7)+3", True, hz) == 0.0  # 66
    assert task.score(inst, f"{block}|(3*7)+9+0", True, hz) == 0.0  # 0 is not a given number
    assert task.score(inst, f"{block}|30", True, hz) == 0.0
    assert task.score(inst, f"{block}|(3/0)+9", True, hz) == 0.0


def test_split_is_disjoint_and_targets_reachable():
    train_keys = {(i.nums, i.target) for i in TRAIN}
    assert not train_keys & {(i.nums, i.target) for i in TEST}
    for inst in TEST:
        assert inst.target in {y for _, _, y in task.attempts(inst.nums)}


def test_tokenizer_padding_and_decoding():
    tok = CharTokenizer(4096)
    assert tok.num_invalid == 4096 - 24 and int(tok.invalid_mask().sum()) == tok.num_invalid
    ids = tok.encode("3*7=21,21+9=30|(3*7)+9")
    assert not tok.invalid_mask()[ids].any()
    assert tok.decode(ids + [EOS, 5]) == "3*7=21,21+9=30|(3*7)+9"
    assert tok.decode([ids[0], 4000]) == "3?"
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("3x")
    with pytest.raises(ValueError, match="vocab_size"):
        CharTokenizer(10)


def test_sampled_log_probs_match_teacher_forcing():
    """GRPO uses the sampler's log-probabilities as the old policy's: they must equal a teacher-forced pass."""
    torch.manual_seed(0)
    tok = CharTokenizer(256)
    policy = GRUPolicy(256, 16, 32)
    prompts = encode_prompts(tok, [i.prompt() for i in TRAIN[:16]])
    roll = sample(policy, prompts, 20, generator=torch.Generator().manual_seed(1))
    logits = policy.response_logits(prompts, roll.responses)
    forced = torch.log_softmax(logits, -1).gather(-1, roll.responses[..., None]).squeeze(-1)
    torch.testing.assert_close(forced * roll.mask, roll.log_probs, atol=1e-5, rtol=1e-5)
    # rows stop at their first <eos>
    for row, m, fin in zip(roll.responses, roll.mask, roll.finished):
        n = int(m.sum())
        assert (row[: n - 1] != EOS).all() and (not fin or row[n - 1] == EOS)


def test_widen_keeps_the_small_policy_and_copies_its_tail():
    torch.manual_seed(0)
    small = GRUPolicy(64, 16, 32)
    wide = widen(small, 1024, seed=0)
    tokens = torch.randint(0, 24, (4, 10))
    small_logits, _ = small(tokens)
    wide_logits, _ = wide(tokens)
    torch.testing.assert_close(wide_logits[..., :64], small_logits)
    tail = set(small.head.bias[24:].tolist())
    assert set(wide.head.bias[64:].tolist()) <= tail


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_grpo_steps_per_variant(variant):
    """Smoke: every variant trains two steps at a large V; statistics are finite and in range."""
    torch.manual_seed(0)
    kind, scale = VARIANTS[variant]
    tok = CharTokenizer(1024)
    policy = GRUPolicy(1024, 16, 32)
    before = [p.detach().clone() for p in policy.parameters()]
    reg = Regularizer(kind, 0.0 if kind == "none" else 0.05, scale)
    cfg = RLConfig(steps=2, prompts_per_step=4, group_size=4, log_every=1)
    history = train(policy, tok, TRAIN, task.HORIZONS["short"], reg, cfg, seed=0)
    assert len(history) == 2
    last = history[-1]
    assert 0 < last["invalid_mass"] < 1 and 0 <= last["invalid_response"] <= 1
    assert 0 < last["entropy_full"] <= torch.log(torch.tensor(1024.0)) + 1e-4
    assert 1 <= last["tre_p_size"] <= 1024
    changed = any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed or kind == "none"  # no reward at random init: only a regularizer moves the weights


def test_full_entropy_bonus_raises_tail_mass_against_none():
    """The mechanism itself, at small scale: with no reward signal, the full-entropy bonus spreads probability into
    the never-valid ids, TRE-K (whose region holds two tokens) does not."""
    results = {}
    for kind in ("none", "full", "tre_k"):
        torch.manual_seed(0)
        tok = CharTokenizer(512)
        policy = GRUPolicy(512, 16, 32)
        with torch.no_grad():
            policy.head.bias[24:] -= 6.0  # a policy that has learned to avoid the tail
        reg = Regularizer(kind, 0.0 if kind == "none" else 0.1)
        cfg = RLConfig(steps=4, prompts_per_step=4, group_size=4, log_every=1, lr=1e-2)
        results[kind] = train(policy, tok, TRAIN, task.HORIZONS["short"], reg, cfg, seed=0)[-1]["invalid_mass"]
    assert results["full"] > 2 * results["none"]
    assert results["tre_k"] < 1.5 * results["none"]


def test_permutation_p_exact():
    assert permutation_p([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]) == pytest.approx(2 / 70)
    assert permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert permutation_p([1.0], [2.0]) == 1.0


def test_bad_study_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown variants"):
        StudyConfig(variants=("none", "tre_x"))
    with pytest.raises(ValueError, match="coeff"):
        StudyConfig(coeff=0.0)
    with pytest.raises(ValueError, match="divisible"):
        RLConfig(prompts_per_step=3, minibatches=2)


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path):
    """A tiny study through the CLI's code path: warm starts, every variant, report files; a rerun resumes
    without redoing work, and a different configuration is refused."""
    cfg = StudyConfig(
        vocab_sizes=(64, 256),
        seeds=(0, 1),
        n_test=16,
        sft=SFTConfig(steps=8, batch=16, embed_dim=16, hidden_dim=32, widen_steps=2),
        rl=RLConfig(steps=2, prompts_per_step=2, group_size=4, log_every=1),
    )
    summary = run_study(cfg, tmp_path, workers=1)
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == len(cfg.runs()) == 2 * 2 * len(VARIANTS) * 2
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "accuracy.png").stat().st_size > 10_000
    text = summary.read_text()
    assert "| 256 | long | TRE-P (p=0.99), equal strength |" in text and "**What the noise allows.**" in text
    record = json.loads(runs[0].read_text())
    assert {"history", "before", "final", "collapsed"} <= set(record)

    stamps = {p: p.stat().st_mtime_ns for p in runs}
    run_study(cfg, tmp_path, workers=1)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    with pytest.raises(ValueError, match="different settings"):
        run_study(replace(cfg, coeff=0.5), tmp_path, workers=1)
