"""The exploration baselines the paper compares TRE against, as pure functions on [batch, response_length] tensors.

* Forking Tokens (Wang et al. 2025, "Beyond the 80/20 Rule"): the policy-gradient loss is kept on the
  ``top_ratio`` highest-entropy response tokens only (ceil(ratio * n_valid), at least one).
* KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"), the TRE reference's variant: on the
  tokens whose centred covariance between advantage and log-probability is largest (ratio of the valid tokens,
  floor, at least one), the clipped PPO loss gets ``+ ppo_kl_coef * |log_prob - old_log_prob|``. Registered with
  verl's policy-loss registry as ``clipped_kl_cov``; verl's own ``kl_cov`` (an unclipped surrogate) is untouched.

Token selection ranks tokens on the device (no host synchronization, exactly the requested count, ties broken by
position) and ignores padding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss, register_policy_loss

__all__ = [
    "top_tokens_mask",
    "forking_token_mask",
    "forking_threshold",
    "kl_cov_token_count",
    "kl_cov_mask",
    "compute_policy_loss_clipped_kl_cov",
    "CLIPPED_KL_COV",
]

CLIPPED_KL_COV = "clipped_kl_cov"


def top_tokens_mask(scores: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``count`` valid positions with the largest scores.

    Args:
        scores: [B, T] float scores. valid: [B, T] bool or 0/1 mask of positions that may be chosen.
        count: 0-d integer tensor (or int), the number of positions to keep; more than the valid ones keeps all.

    Returns:
        [B, T] bool mask with min(count, n_valid) True entries, all valid.
    """
    valid = valid.bool()
    flat = torch.where(valid, scores.float(), torch.full_like(scores, -torch.inf, dtype=torch.float32)).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return (rank.view_as(valid) < count) & valid


def forking_token_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2) -> torch.Tensor:
    """Forking-Tokens selection within one batch: the ceil(top_ratio * n_valid) (>= 1) highest-entropy tokens.

    Args:
        entropy: [B, T] full-vocabulary entropy per token (detached; nats).
        response_mask: [B, T] 1 for response tokens, 0 for padding.
        top_ratio: fraction of the valid tokens to keep, in (0, 1].

    Returns:
        [B, T] bool mask; empty when there is no valid token.
    """
    n_valid = response_mask.bool().sum()
    count = torch.clamp(torch.ceil(n_valid * top_ratio), min=1).long()
    return top_tokens_mask(entropy.detach(), response_mask, count)


def forking_threshold(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2, group=None) -> torch.Tensor:
    """Entropy threshold of the Forking-Tokens selection over all tokens of all data-parallel ranks.

    Gathers the valid entropies of every rank (``group``: the data-parallel process group; ignored when
    torch.distributed is not initialized) and returns the value of the ceil(top_ratio * n_valid)-th largest, as a
    0-d fp32 tensor; tokens with ``entropy >= threshold`` are kept (ties at the threshold are all kept). +inf when no
    rank has a valid token. Synchronizes once (to exchange the counts); call it once per mini-batch.

    Args:
        entropy: [B, T] detached full entropy of this rank's mini-batch. response_mask: [B, T].
    """
    values = entropy.detach().float()[response_mask.bool()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sizes = torch.tensor([values.numel()], device=values.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(group))]
        dist.all_gather(all_sizes, sizes, group=group)
        longest = int(max(s.item() for s in all_sizes))
        padded = torch.full((longest,), -torch.inf, device=values.device)
        padded[: values.numel()] = values
        gathered = [torch.empty_like(padded) for _ in all_sizes]
        dist.all_gather(gathered, padded, group=group)
        values = torch.cat([g[: int(s.item())] for g, s in zip(gathered, all_sizes)])
    if values.numel() == 0:
        return torch.tensor(torch.inf, device=entropy.device)
    count = max(1, math.ceil(values.numel() * top_ratio))
    return torch.topk(values, min(count, values.numel())).values[-1]


def kl_cov_token_count(response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Number of tokens KL-Cov penalizes: floor(ratio * n_valid), at least 1 (0 without valid tokens); 0-d long."""
    n_valid = response_mask.bool().sum()
    return torch.where(n_valid > 0, torch.clamp(torch.floor(n_valid * ratio), min=1), torch.zeros_like(n_valid, dtype=torch.float32)).long()


def kl_cov_mask(advantages: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """KL-Cov selection: the valid tokens with the largest (A - mean A) * (logp - mean logp), means over valid tokens.

    Args:
        advantages, log_prob, response_mask: [B, T]. ratio: fraction of valid tokens, in (0, 1].

    Returns:
        [B, T] bool mask with kl_cov_token_count(response_mask, ratio) entries.
    """
    valid = response_mask.bool()
    n_valid = valid.sum().clamp(min=1)
    adv = advantages.detach().float()
    logp = log_prob.detach().float()
    adv_mean = torch.where(valid, adv, 0).sum() / n_valid
    logp_mean = torch.where(valid, logp, 0).sum() / n_valid
    cov = (adv - adv_mean) * (logp - logp_mean)
    return top_tokens_mask(cov, valid, kl_cov_token_count(response_mask, ratio))


@register_policy_loss(CLIPPED_KL_COV)
def compute_policy_loss_clipped_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None):
    """The paper's KL-Cov: verl's clipped (dual-clip) PPO loss plus a |log-ratio| penalty on high-covariance tokens.

    Args:
        old_log_prob, log_prob, advantages, response_mask: [B, T].
        loss_agg_mode: verl's aggregation mode.
        config: the actor config; reads clip_ratio(_low/_high/_c), policy_loss.kl_cov_ratio and
            policy_loss.ppo_kl_coef.

    Returns:
        (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d tensors, as verl's policy losses.
    """
    clip = config.clip_ratio
    low = config.get("clip_ratio_low")
    high = config.get("clip_ratio_high")
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = compute_policy_loss(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        cliprange=clip,
        cliprange_low=clip if low is None else low,
        cliprange_high=clip if high is None else high,
        clip_ratio_c=config.get("clip_ratio_c", 3.0),
        loss_agg_mode=loss_agg_mode,
    )
    selected = kl_cov_mask(advantages, log_prob, response_mask, config.policy_loss.kl_cov_ratio)
    penalty = selected * (config.policy_loss.ppo_kl_coef * (log_prob - old_log_prob).abs())
    # Every aggregation mode is linear in the per-token losses, so the penalty adds after aggregation.
    return pg_loss + agg_loss(penalty, response_mask, loss_agg_mode), clipfrac, ppo_kl, clipfrac_lower
