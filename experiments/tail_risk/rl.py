"""A minimal GRPO loop built from the same pieces as the project's actor.

Advantages: verl's GRPO estimator (group mean and std over ``group_size`` responses per prompt). Policy loss:
verl's clipped PPO loss with token-mean aggregation. Regularizer: the project's ``entropy_from_logits`` (full,
TRE-K or TRE-P), composed as the actor does: loss = pg_loss - coeff * agg_loss(value, response_mask).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm
from verl.trainer.ppo.core_algos import agg_loss, compute_grpo_outcome_advantage, compute_policy_loss

from verl_tre.utils.torch_functional import entropy_from_logits

from .metrics import invalid_response_fraction, score_rollout, token_stats
from .policy import GRUPolicy, encode_prompts, sample
from .task import Horizon, Instance
from .tokenizer import CharTokenizer

LOSS_AGG_MODE = "token-mean"


@dataclass(frozen=True)
class Regularizer:
    """The exploration term. kind: "none", "full", "tre_k" (K = top_k) or "tre_p" (p = top_p); coeff: its weight;
    scale: keep the log V / log |T| factor of TRE (False = the "equal effective strength" option)."""

    kind: Literal["none", "full", "tre_k", "tre_p"] = "none"
    coeff: float = 0.0
    scale: bool = True
    top_k: int = 2
    top_p: float = 0.99

    def __post_init__(self):
        if self.kind not in ("none", "full", "tre_k", "tre_p"):
            raise ValueError(f"regularizer kind must be none, full, tre_k or tre_p, got {self.kind!r}")
        if self.coeff < 0 or (self.kind == "none") != (self.coeff == 0):
            raise ValueError(f"coeff must be 0 for kind 'none' and > 0 otherwise, got kind={self.kind!r} coeff={self.coeff}")

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, R, V] logits -> [B, R] differentiable per-token entropy term."""
        if self.kind == "full":
            return entropy_from_logits(logits)
        if self.kind == "tre_k":
            return entropy_from_logits(logits, top_k=self.top_k, scale=self.scale)
        return entropy_from_logits(logits, top_p=self.top_p, scale=self.scale)


@dataclass(frozen=True)
class RLConfig:
    """steps: rollout/update rounds; prompts_per_step x group_size responses per round, split into ``minibatches``
    sequential updates (PPO-style, one epoch); lr: Adam; clip: PPO ratio clip; grad_clip: max grad norm (verl's
    default 1.0); log_every: steps between token-level statistics (they cost two extra passes over [tokens, V])."""

    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    minibatches: int = 2
    lr: float = 3e-4
    clip: float = 0.2
    grad_clip: float = 1.0
    log_every: int = 10

    def __post_init__(self):
        if self.prompts_per_step % self.minibatches:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by minibatches ({self.minibatches}) "
                "so that every group stays in one mini-batch"
            )
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for GRPO's group baseline, got {self.group_size}")


def _outcome_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] scores -> [B, R] token-level rewards with the score on each response's last token."""
    token_rewards = torch.zeros_like(mask)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(mask.shape[0]), last] = rewards
    return token_rewards


def train(
    policy: GRUPolicy,
    tokenizer: CharTokenizer,
    train_set: list[Instance],
    horizon: Horizon,
    regularizer: Regularizer,
    cfg: RLConfig,
    seed: int,
    progress: bool = False,
) -> list[dict]:
    """Runs GRPO on ``policy`` in place; returns one dict of metrics per step (token statistics every
    ``cfg.log_every`` steps and on the last)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    invalid = tokenizer.invalid_mask()
    history = []
    for step in tqdm(range(cfg.steps), desc="GRPO", disable=not progress, leave=False):
        chosen = rng.choices(train_set, k=cfg.prompts_per_step)
        instances = [inst for inst in chosen for _ in range(cfg.group_size)]
        prompts = encode_prompts(tokenizer, [inst.prompt() for inst in instances])
        roll = sample(policy, prompts, horizon.max_response_len, generator=generator)
        width = int(roll.mask.sum(-1).max())
        responses, mask, old_log_prob = roll.responses[:, :width], roll.mask[:, :width], roll.log_probs[:, :width]
        rewards = score_rollout(tokenizer, instances, responses, roll.finished, horizon)
        index = np.repeat(np.arange(cfg.prompts_per_step), cfg.group_size)
        advantages, _ = compute_grpo_outcome_advantage(_outcome_rewards(rewards, mask), mask, index)

        record = {
            "step": step,
            "reward": float(rewards.mean()),
            "invalid_response": invalid_response_fraction(responses, mask, invalid),
            "length": float(mask.sum(-1).mean()),
            "finished": float(roll.finished.float().mean()),
        }
        log_stats = step % cfg.log_every == 0 or step == cfg.steps - 1
        per_mb = len(instances) // cfg.minibatches
        for mb in range(cfg.minibatches):
            rows = slice(mb * per_mb, (mb + 1) * per_mb)
            logits = policy.response_logits(prompts[rows], responses[rows])
            log_prob = torch.log_softmax(logits, dim=-1).gather(-1, responses[rows, :, None]).squeeze(-1)
            pg_loss, clipfrac, _, _ = compute_policy_loss(
                old_log_prob[rows], log_prob, advantages[rows], mask[rows], cliprange=cfg.clip, loss_agg_mode=LOSS_AGG_MODE
            )
            loss = pg_loss
            if regularizer.kind != "none":
                entropy_term = agg_loss(regularizer.value(logits), mask[rows], LOSS_AGG_MODE)
                loss = pg_loss - regularizer.coeff * entropy_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            if mb == 0:
                record["clipfrac"] = float(clipfrac)
                if log_stats:
                    # Logits of the first mini-batch before its update: the rollout policy's own distribution.
                    record.update(token_stats(logits, mask[rows], invalid))
        history.append(record)
    return history
