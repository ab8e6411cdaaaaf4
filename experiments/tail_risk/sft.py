"""Supervised warm start: teacher-forced cross-entropy on generated demonstrations.

RL from a random policy would never see a reward; a short supervised pass gives the policy the format and a
partial skill (the wrong attempts are random, and picking the right last attempt is the hard part), which is
where RL, and an entropy bonus, can then change something.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .policy import GRUPolicy, encode_prompts
from .task import Horizon, Instance, demonstration
from .tokenizer import EOS, PAD, CharTokenizer


@dataclass(frozen=True)
class SFTConfig:
    """steps: optimizer steps on the base vocabulary; batch: demonstrations per step; lr: Adam's initial learning
    rate (cosine-decayed to 0); base_vocab: the vocabulary the skill is learned on; widen_steps / widen_lr: the
    fine-tune after widening to a larger padded vocabulary."""

    steps: int = 1200
    batch: int = 64
    lr: float = 5e-3
    embed_dim: int = 64
    hidden_dim: int = 128
    base_vocab: int = 64
    widen_steps: int = 100
    widen_lr: float = 1e-3


def demonstration_batch(tokenizer: CharTokenizer, instances: list[Instance], horizon: Horizon, rng: random.Random):
    """(prompts [B, P], responses [B, R], mask [B, R]) for fresh demonstrations, each ending with <eos>."""
    texts = [tokenizer.encode(demonstration(inst, horizon, rng)) + [EOS] for inst in instances]
    width = max(map(len, texts))
    responses = torch.tensor([ids + [PAD] * (width - len(ids)) for ids in texts])
    mask = torch.tensor([[1.0] * len(ids) + [0.0] * (width - len(ids)) for ids in texts])
    return encode_prompts(tokenizer, [inst.prompt() for inst in instances]), responses, mask


def supervise(
    policy: GRUPolicy,
    tokenizer: CharTokenizer,
    train: list[Instance],
    horizon: Horizon,
    rng: random.Random,
    steps: int,
    batch: int,
    lr: float,
    progress: bool = False,
) -> GRUPolicy:
    """Trains ``policy`` in place on ``steps`` batches of fresh demonstrations (token-mean cross-entropy)."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    # Cosine decay: the same skill in fewer steps than a constant rate, and SFT is a fixed cost of every cell.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    for _ in tqdm(range(steps), desc=f"SFT V={tokenizer.vocab_size} {horizon.name}", disable=not progress, leave=False):
        prompts, responses, mask = demonstration_batch(tokenizer, rng.choices(train, k=batch), horizon, rng)
        logits = policy.response_logits(prompts, responses)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), responses, reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return policy


def base_policy(train: list[Instance], horizon: Horizon, seed: int, cfg: SFTConfig, progress: bool = False) -> GRUPolicy:
    """The warm start on ``cfg.base_vocab`` ids (seeded: same seed, same policy)."""
    torch.manual_seed(seed)
    tokenizer = CharTokenizer(cfg.base_vocab)
    policy = GRUPolicy(cfg.base_vocab, cfg.embed_dim, cfg.hidden_dim)
    return supervise(policy, tokenizer, train, horizon, random.Random(seed), cfg.steps, cfg.batch, cfg.lr, progress)


@torch.no_grad()
def widen(policy: GRUPolicy, vocab_size: int, seed: int) -> GRUPolicy:
    """A copy of ``policy`` over ``vocab_size`` ids. The added ids are never valid, so each gets the embedding and
    output row of a randomly chosen never-valid id of the smaller vocabulary: the tail starts as the small
    policy's tail, only wider."""
    small = policy.head.out_features
    base = CharTokenizer(small).base_size
    if vocab_size < small or small == base:
        raise ValueError(f"can only widen to V >= {small} from a vocabulary with never-valid ids, got V={vocab_size}")
    wide = GRUPolicy(vocab_size, policy.embed.embedding_dim, policy.gru.hidden_size)
    wide.gru.load_state_dict(policy.gru.state_dict())
    donors = torch.randint(base, small, (vocab_size - small,), generator=torch.Generator().manual_seed(seed))
    rows = torch.cat([torch.arange(small), donors])
    wide.embed.weight.copy_(policy.embed.weight[rows])
    wide.head.weight.copy_(policy.head.weight[rows])
    wide.head.bias.copy_(policy.head.bias[rows])
    return wide


def warm_starts(
    train: list[Instance], horizon: Horizon, vocab_sizes, seed: int, cfg: SFTConfig, progress: bool = False
) -> dict[int, GRUPolicy]:
    """{V: warm-start policy}. The skill is learned once on the base vocabulary; every larger V is that policy
    widened and fine-tuned for ``cfg.widen_steps`` at its own V, so the cells differ in the tail, not the skill."""
    base = base_policy(train, horizon, seed, cfg, progress)
    out = {}
    for vocab in vocab_sizes:
        if vocab == cfg.base_vocab:
            out[vocab] = base
            continue
        wide = widen(base, vocab, seed)
        rng = random.Random(seed + vocab)
        out[vocab] = supervise(wide, CharTokenizer(vocab), train, horizon, rng, cfg.widen_steps, cfg.batch, cfg.widen_lr, progress)
    return out
