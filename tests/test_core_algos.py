"""Forking-Tokens and KL-Cov selections and the clipped KL-Cov loss against brute-force references."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from verl_tre.trainer.ppo.core_algos import (
    forking_threshold,
    forking_token_mask,
    kl_cov_mask,
    kl_cov_token_count,
    top_tokens_mask,
)


def random_batch(seed, rows=5, cols=9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cols + 1, (rows,), generator=gen)
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).long()
    return torch.rand(rows, cols, generator=gen) * 5, mask, gen


def brute_force_top(scores, mask, count):
    """Positions of the `count` largest valid scores, by walking a Python-sorted list (ties: earlier position)."""
    items = sorted(((-scores[i, j].item(), i * scores.shape[1] + j) for i, j in mask.nonzero().tolist()))
    chosen = torch.zeros_like(mask, dtype=torch.bool).flatten()
    for _, flat in items[:count]:
        chosen[flat] = True
    return chosen.view_as(mask)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_forking_mask_keeps_the_highest_entropy_valid_tokens(seed, ratio):
    entropy, mask, _ = random_batch(seed)
    n_valid = int(mask.sum())
    keep = forking_token_mask(entropy, mask, ratio)
    expected = brute_force_top(entropy, mask, max(1, math.ceil(ratio * n_valid))) if n_valid else torch.zeros_like(keep)
    assert torch.equal(keep, expected)
    assert not (keep & ~mask.bool()).any()


def test_forking_mask_with_ties_keeps_exactly_the_count():
    entropy = torch.ones(3, 4)
    mask = torch.ones(3, 4, dtype=torch.long)
    assert int(forking_token_mask(entropy, mask, 0.25).sum()) == 3


def test_forking_mask_on_an_empty_batch_is_empty():
    keep = forking_token_mask(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.2)
    assert not keep.any()


def test_at_least_one_token_is_kept():
    entropy = torch.rand(1, 3)
    assert int(forking_token_mask(entropy, torch.tensor([[1, 0, 0]]), 0.01).sum()) == 1


def test_top_tokens_mask_caps_at_the_valid_count():
    scores = torch.rand(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.equal(top_tokens_mask(scores, mask, torch.tensor(10)), mask.bool())


@pytest.mark.parametrize("seed", range(5))
def test_forking_threshold_single_process(seed):
    entropy, mask, _ = random_batch(seed, rows=6, cols=11)
    valid = entropy[mask.bool()]
    threshold = forking_threshold(entropy, mask, 0.2)
    if valid.numel() == 0:
        assert threshold == math.inf
        return
    assert threshold == valid.sort(descending=True).values[math.ceil(0.2 * valid.numel()) - 1]


def _threshold_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    entropy, mask, _ = random_batch(100 + rank, rows=3 + rank, cols=7)  # ranks hold different token counts
    results[rank] = float(forking_threshold(entropy, mask, 0.3))
    dist.destroy_process_group()


@pytest.mark.slow  # three processes importing verl: ~35 s on 2 cores
def test_forking_threshold_gathers_across_ranks():
    world, port = 3, 29400 + os.getpid() % 500
    results = mp.Manager().dict()
    mp.spawn(_threshold_worker, args=(world, port, results), nprocs=world, join=True)
    values = torch.cat([random_batch(100 + r, rows=3 + r, cols=7)[0][random_batch(100 + r, rows=3 + r, cols=7)[1].bool()] for r in range(world)])
    expected = float(values.sort(descending=True).values[math.ceil(0.3 * values.numel()) - 1])
    assert [results[r] for r in range(world)] == [expected] * world


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ratio", [0.002, 0.1, 0.5])
def test_kl_cov_mask_matches_brute_force(seed, ratio):
    adv, mask, gen = random_batch(seed)
    logp = -torch.rand(adv.shape, generator=gen) * 4
    valid = mask.bool()
    keep = kl_cov_mask(adv, logp, mask, ratio)
    if not valid.any():
        assert not keep.any() and int(kl_cov_token_count(mask, ratio)) == 0
        return
    cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
    count = max(1, int(valid.sum().item() * ratio))
    assert int(kl_cov_token_count(mask, ratio)) == count
    assert torch.equal(keep, brute_force_top(cov, mask, count))


def _actor_config(ratio, coef):
    return OmegaConf.create(
        {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 3.0,
         "policy_loss": {"loss_mode": "clipped_kl_cov", "kl_cov_ratio": ratio, "ppo_kl_coef": coef}}
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_clipped_kl_cov_loss_is_clipped_ppo_plus_the_penalty(agg):
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    old = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    loss_fn = get_policy_loss_fn("clipped_kl_cov")
    loss, *_ = loss_fn(old, logp, adv, mask, agg, _actor_config(0.25, 1.5))

    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * 3.0), clipped)
    valid = mask.bool()
    cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
    chosen = brute_force_top(cov, mask.long(), int(valid.sum() * 0.25))
    per_token = per_token + chosen * 1.5 * (logp - old).abs()
    if agg == "token-mean":
        expected = (per_token * mask).sum() / mask.sum()
    elif agg == "seq-mean-token-mean":
        expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    else:
        expected = (per_token * mask).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
