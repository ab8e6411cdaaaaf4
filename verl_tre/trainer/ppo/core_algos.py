"""The exploration baselines the paper compares TRE against, as pure functions on [batch, response_length] tensors.

* Forking Tokens (Wang et al. 2025, "Beyond the 80/20 Rule"): the policy-gradient loss is kept on the
  ``top_ratio`` highest-entropy response tokens only: exactly ceil(ratio * n_valid) of them, at least one, with the
  ratio read as the decimal written in the config (0.3 keeps 15 of 50; see ``forking_count``), in either scope.
* KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"), the TRE reference's variant: on the
  tokens whose centred covariance between advantage and log-probability is largest (ratio of the valid tokens,
  floor, at least one), the clipped PPO loss gets ``+ ppo_kl_coef * |log_prob - old_log_prob|``. Registered with
  verl's policy-loss registry as ``clipped_kl_cov``; verl's own ``kl_cov`` (an unclipped surrogate) is untouched.

Token selection ranks tokens on the device (no host synchronization, exactly the requested count, ties broken by
position) and ignores padding.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss, register_policy_loss

__all__ = [
    "top_tokens_mask",
    "forking_count",
    "forking_token_mask",
    "forking_mini_batch_mask",
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


def _ratio_fraction(top_ratio: float) -> Fraction:
    """The ratio as the shortest decimal that prints as it (0.3 -> 3/10, not the binary 0.29999...), with its
    denominator bounded by 2**31 so that n * numerator stays exact in int64 for any n below 2**32."""
    return Fraction(repr(float(top_ratio))).limit_denominator(1 << 31)


def forking_count(n_valid, top_ratio: float):
    """Tokens Forking Tokens keeps out of ``n_valid``: ceil(top_ratio * n_valid) in exact integer arithmetic, at
    least 1. ``n_valid``: a Python int (returns an int) or an integer tensor (returns a long tensor, on its device,
    without a host sync)."""
    ratio = _ratio_fraction(top_ratio)
    num, den = ratio.numerator, ratio.denominator
    if isinstance(n_valid, torch.Tensor):
        return torch.clamp((n_valid.long() * num + (den - 1)) // den, min=1)
    return max(1, (int(n_valid) * num + den - 1) // den)


def forking_token_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2) -> torch.Tensor:
    """Forking-Tokens selection within one batch: the forking_count(n_valid) highest-entropy tokens, ties broken by
    position.

    Args:
        entropy: [B, T] full-vocabulary entropy per token (detached; nats).
        response_mask: [B, T] 1 for response tokens, 0 for padding.
        top_ratio: fraction of the valid tokens to keep, in (0, 1].

    Returns:
        [B, T] bool mask; empty when there is no valid token.
    """
    count = forking_count(response_mask.bool().sum(), top_ratio)
    return top_tokens_mask(entropy.detach(), response_mask, count)


def forking_mini_batch_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2, group=None):
    """Forking-Tokens selection over all tokens of all data-parallel ranks (scope=mini_batch).

    Gathers the entropies and masks of every rank (``group``: the data-parallel process group; ignored when
    torch.distributed is not initialized) and keeps exactly forking_count(n_valid over all ranks) tokens, the same
    on every rank: the highest entropies, ties broken by rank, then by position in the flattened [B, T] order (on
    one rank: the same tokens as forking_token_mask over the whole batch). Synchronizes once (to exchange the
    counts); call it once per mini-batch.

    Args:
        entropy: [B, T] detached full entropy of this rank's mini-batch. response_mask: [B, T].

    Returns:
        (keep [B, T] bool, threshold): threshold is the smallest kept entropy over all ranks as a 0-d fp32 tensor,
        +inf when no rank has a valid token.
    """
    valid = response_mask.bool()
    rows = torch.stack([torch.where(valid, entropy.detach().float(), -torch.inf).flatten(), valid.flatten().float()])
    offset = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sizes = torch.tensor([rows.shape[1]], device=rows.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(group))]
        dist.all_gather(all_sizes, sizes, group=group)
        lengths = [int(n.item()) for n in all_sizes]
        padded = torch.zeros(2, max(lengths), device=rows.device)
        padded[:, : rows.shape[1]] = rows
        gathered = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(gathered, padded, group=group)
        offset = sum(lengths[: dist.get_rank(group)])
        rows = torch.cat([g[:, :n] for g, n in zip(gathered, lengths)], dim=1)
    scores, everywhere = rows[0:1], rows[1:2].bool()
    keep = top_tokens_mask(scores, everywhere, forking_count(everywhere.sum(), top_ratio))
    threshold = torch.where(keep, scores, torch.inf).amin()
    return keep[0, offset : offset + valid.numel()].view_as(valid), threshold


def forking_threshold(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2, group=None) -> torch.Tensor:
    """The smallest entropy kept by forking_mini_batch_mask (the forking_count-th largest valid entropy over all
    ranks), as a 0-d fp32 tensor; +inf when no rank has a valid token. Synchronizes once."""
    return forking_mini_batch_mask(entropy, response_mask, top_ratio, group)[1]


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
