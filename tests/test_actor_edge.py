"""TREDataParallelPPOActor.update_policy on configurations that once crashed or stopped training: entropy
checkpointing with an entropy bonus, Forking Tokens with seq-mean-token-mean, and the clip/KL metrics of Forking."""

import copy
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from test_actor import PROMPT, TEMPERATURE, actor_config, cpu_process_group, make_batch, response_logits, tiny_policy  # noqa: F401
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor


def _prepared_batch(actor):
    data = make_batch()
    log_probs, _ = actor.compute_log_prob(data)
    mask = data.batch["attention_mask"][:, PROMPT:].bool()
    gen = torch.Generator().manual_seed(2)
    data.batch["old_log_probs"] = (log_probs.float() + 0.3 * torch.randn(log_probs.shape, generator=gen)) * mask
    return data


def _run(cfg, seed=0):
    """(metrics of one update_policy, the parameters after it, the model before it, the data)."""
    model = tiny_policy(seed)
    before = copy.deepcopy(model)
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = _prepared_batch(actor)
    metrics = actor.update_policy(data)
    return metrics, [p.detach().clone() for p in model.parameters()], before, actor, data


@pytest.mark.parametrize("method", ["ppo", "entropy", "tre_k", "tre_k1", "tre_p", "forking_micro"])
def test_entropy_checkpointing_with_an_entropy_bonus_trains_like_without_it(method):
    plain = actor_config(method, remove_padding=True)
    checkpointed = OmegaConf.merge(plain, OmegaConf.create({"entropy_checkpointing": True}))
    expected, expected_params, *_ = _run(plain)
    metrics, params, *_ = _run(checkpointed)
    for name in ("actor/policy_loss", "actor/pg_loss", "actor/regularizer/value", "actor/grad_norm"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7), name
    for a, b in zip(params, expected_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _per_token_pg_loss(logp, old, adv, cfg):
    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * cfg.clip_ratio_c), clipped)
    clipfrac = (-adv * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio) > -adv * ratio).double()
    return per_token, clipfrac, old - logp


def _kept_tokens(model, half, top_ratio):
    """Forking mask of one micro-batch from fp64 entropies: the ceil(ratio * n) highest."""
    logits = response_logits(model, half).double()
    mask = half["attention_mask"][:, PROMPT:].bool()
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.log()).sum(-1)
    count = math.ceil(top_ratio * int(mask.sum()))
    threshold = entropy[mask].sort(descending=True).values[count - 1]
    return mask & (entropy >= threshold), mask


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
def test_forking_with_seq_mean_token_mean_averages_over_sequences_with_kept_tokens(remove_padding):
    cfg = OmegaConf.merge(actor_config("forking_micro", remove_padding), OmegaConf.create({"loss_agg_mode": "seq-mean-token-mean"}))
    model = tiny_policy()
    reference = copy.deepcopy(model)
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = _prepared_batch(actor)
    halves = [data.batch[:2], data.batch[2:]]
    with torch.no_grad():
        logps = [actor._forward_micro_batch(half, TEMPERATURE)[1].double() for half in halves]

    expected, empty_rows = [], 0
    for half, logp in zip(halves, logps):
        keep, _ = _kept_tokens(reference, half, 0.2)
        per_token, _, _ = _per_token_pg_loss(logp, half["old_log_probs"].double(), half["advantages"].double(), cfg)
        seq_losses = [(per_token[b] * keep[b]).sum() / keep[b].sum() for b in range(len(keep)) if keep[b].any()]
        empty_rows += int((~keep.any(-1)).sum())
        expected.append(float(sum(seq_losses) / len(seq_losses)))
    assert empty_rows > 0  # the case that gave 0/0

    before = [p.detach().clone() for p in model.parameters()]
    metrics = actor.update_policy(data)
    assert metrics["actor/pg_loss"] == pytest.approx(expected, rel=1e-3, abs=1e-3 if remove_padding else 1e-5)
    assert all(math.isfinite(v) for v in metrics["actor/grad_norm"] + metrics["actor/policy_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("scope", ["forking_micro", "forking_mini"])
def test_forking_reports_clip_and_kl_metrics_over_all_response_tokens_and_over_the_kept_ones(scope):
    cfg = actor_config(scope, remove_padding=False)
    model = tiny_policy()
    reference = copy.deepcopy(model)
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = _prepared_batch(actor)
    halves = [data.batch[:2], data.batch[2:]]
    with torch.no_grad():
        logps = [actor._forward_micro_batch(half, TEMPERATURE)[1].double() for half in halves]
    if scope == "forking_mini":
        keep_all, _ = _kept_tokens(reference, data.batch, 0.2)
        keeps = [keep_all[:2], keep_all[2:]]
    else:
        keeps = [_kept_tokens(reference, half, 0.2)[0] for half in halves]

    metrics = actor.update_policy(data)
    for i, (half, logp, keep) in enumerate(zip(halves, logps, keeps)):
        mask = half["attention_mask"][:, PROMPT:].bool()
        _, clipfrac, kl = _per_token_pg_loss(logp, half["old_log_probs"].double(), half["advantages"].double(), cfg)
        for name, values in (("pg_clipfrac", clipfrac), ("ppo_kl", kl)):
            assert metrics[f"actor/{name}"][i] == pytest.approx(float(values[mask].mean()), abs=1e-5), name
            assert metrics[f"actor/forking/{name}_kept"][i] == pytest.approx(float(values[keep].mean()), abs=1e-5), name
        assert math.isfinite(metrics["actor/forking/pg_clipfrac_lower_kept"][i])
    assert metrics["actor/pg_clipfrac"] != metrics["actor/forking/pg_clipfrac_kept"]


def test_use_torch_compile_says_the_entropy_terms_run_eagerly(caplog):
    cfg = OmegaConf.merge(actor_config("tre_p", False), OmegaConf.create({"use_torch_compile": True}))
    with caplog.at_level(logging.WARNING):
        TREDataParallelPPOActor(cfg, tiny_policy(), None)
    assert "run eagerly" in caplog.text
