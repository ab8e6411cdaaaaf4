"""What the study reads out: rewards, tail mass, entropies, held-out accuracy.

All entropy-like numbers come from the project's own ``trust_region_stats`` (verl_tre.utils.torch_functional),
so the curves show exactly the quantities the regularizers act on.
"""

from __future__ import annotations

import torch

from verl_tre.utils.torch_functional import trust_region_stats

from .policy import GRUPolicy, encode_prompts, sample
from .task import Horizon, Instance, score
from .tokenizer import CharTokenizer

TRE_K, TRE_P = 2, 0.99  # the paper's regions, logged for every variant


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))


def score_rollout(tokenizer: CharTokenizer, instances: list[Instance], responses, finished, horizon: Horizon) -> torch.Tensor:
    """[B] float rewards of sampled responses [B, R] for ``instances`` (one per row)."""
    return torch.tensor(
        [score(inst, tokenizer.decode(row), bool(fin), horizon) for inst, row, fin in zip(instances, responses, finished)]
    )


def token_stats(logits: torch.Tensor, mask: torch.Tensor, invalid: torch.Tensor, regions: bool = True) -> dict[str, float]:
    """Per-token means over the response positions.

    logits [B, R, V] (temperature 1), mask [B, R] (1 on response tokens), invalid [V] bool.
    Returns: invalid_mass (probability on never-valid ids), entropy_full (nats), top1_prob and, with ``regions``
    (two more passes over the logits), tre_k / tre_p (the scaled TRE values, K = 2, p = 0.99,
    in [0, log V]), tre_p_size (nucleus size, tokens), tre_p_mass (its probability).
    """
    logits = logits.detach().float()
    probs = torch.softmax(logits, dim=-1)
    full = trust_region_stats(logits)
    basic = {
        "invalid_mass": _masked_mean(probs[..., invalid].sum(-1), mask),
        "entropy_full": _masked_mean(full["entropy_full"], mask),
        "top1_prob": _masked_mean(full["topk_prob"], mask),
    }
    if not regions:
        return basic
    k_stats = trust_region_stats(logits, top_k=TRE_K)
    p_stats = trust_region_stats(logits, top_p=TRE_P)
    return {
        **basic,
        "tre_k": _masked_mean(k_stats["tre_value"], mask),
        "tre_p": _masked_mean(p_stats["tre_value"], mask),
        "tre_p_size": _masked_mean(p_stats["region_size"], mask),
        "tre_p_mass": _masked_mean(p_stats["region_mass"], mask),
    }


def invalid_response_fraction(responses: torch.Tensor, mask: torch.Tensor, invalid: torch.Tensor) -> float:
    """Fraction of responses [B, R] holding at least one never-valid token among their unmasked positions."""
    hit = invalid[responses] & (mask > 0)
    return float(hit.any(dim=-1).float().mean())


@torch.no_grad()
def evaluate(
    policy: GRUPolicy,
    tokenizer: CharTokenizer,
    instances: list[Instance],
    horizon: Horizon,
    generator: torch.Generator,
) -> dict[str, float]:
    """Held-out readout: one sampled (temperature 1) and one greedy response per instance.

    Returns acc_sampled, acc_greedy, finished (fraction of sampled responses that ended with <eos>), length (mean
    sampled tokens), invalid_response (fraction of sampled responses with a never-valid token), and the
    ``token_stats`` of the sampled responses (without the region statistics, which training logs).
    """
    invalid = tokenizer.invalid_mask()
    prompts = encode_prompts(tokenizer, [inst.prompt() for inst in instances])
    greedy = sample(policy, prompts, horizon.max_response_len, greedy=True)
    sampled = sample(policy, prompts, horizon.max_response_len, generator=generator)
    logits = policy.response_logits(prompts, sampled.responses)
    return {
        "acc_sampled": float(score_rollout(tokenizer, instances, sampled.responses, sampled.finished, horizon).mean()),
        "acc_greedy": float(score_rollout(tokenizer, instances, greedy.responses, greedy.finished, horizon).mean()),
        "finished": float(sampled.finished.float().mean()),
        "length": float(sampled.mask.sum(-1).mean()),
        "invalid_response": invalid_response_fraction(sampled.responses, sampled.mask, invalid),
        **token_stats(logits, sampled.mask, invalid, regions=False),
    }
