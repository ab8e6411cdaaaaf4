"""A tiny autoregressive policy (embedding -> GRU -> linear head over the whole padded vocabulary).

A GRU rather than a transformer: on one CPU core it samples a token per step in O(1), and the study's cost is
dominated by the [tokens, V] output layer anyway, which is exactly the part the tail-risk question is about.
Prompts are left-padded to a fixed width so that sampling and training see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .tokenizer import BOS, EOS, PAD, CharTokenizer

PROMPT_WIDTH = 9  # <bos> + the longest prompt, "9,9,9>99"


class GRUPolicy(nn.Module):
    """Logits over all V ids for every position.

    Args:
        vocab_size: V, the padded vocabulary (input and output width).
        embed_dim, hidden_dim: sizes of the embedding and the single GRU layer.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        """tokens [B, T] ids -> (logits [B, T, V] fp32, state [1, B, hidden])."""
        out, state = self.gru(self.embed(tokens), state)
        return self.head(out), state

    def response_logits(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits that predict each response token: prompts [B, P], responses [B, R] -> [B, R, V]."""
        tokens = torch.cat([prompts, responses[:, :-1]], dim=1)
        logits, _ = self(tokens)
        return logits[:, prompts.shape[1] - 1 :]


@dataclass
class Rollout:
    """Sampled responses. responses [B, R] ids (<pad> after <eos>); mask [B, R] 1.0 up to and including <eos>;
    log_probs [B, R] log-probability of each sampled token under the sampling policy; finished [B] bool (<eos>
    was produced within R tokens)."""

    responses: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor
    finished: torch.Tensor


def encode_prompts(tokenizer: CharTokenizer, prompts: list[str]) -> torch.Tensor:
    """[B, PROMPT_WIDTH] ids: <bos> + prompt, left-padded with <pad>."""
    rows = []
    for text in prompts:
        ids = [BOS] + tokenizer.encode(text)
        if len(ids) > PROMPT_WIDTH:
            raise ValueError(f"prompt {text!r} is longer than the fixed width {PROMPT_WIDTH - 1}")
        rows.append([PAD] * (PROMPT_WIDTH - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def sample(
    policy: GRUPolicy, prompts: torch.Tensor, max_len: int, *, greedy: bool = False, generator: torch.Generator | None = None
) -> Rollout:
    """Samples at temperature 1 over the whole vocabulary (or takes the argmax when ``greedy``), stopping each row at
    <eos>. prompts [B, P] -> Rollout with R = max_len columns."""
    batch = prompts.shape[0]
    logits, state = policy(prompts)
    last = logits[:, -1]
    responses = torch.full((batch, max_len), PAD, dtype=torch.long)
    log_probs = torch.zeros(batch, max_len)
    mask = torch.zeros(batch, max_len)
    done = torch.zeros(batch, dtype=torch.bool)
    for t in range(max_len):
        logp = torch.log_softmax(last.float(), dim=-1)
        token = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        live = ~done
        responses[live, t] = token[live]
        log_probs[live, t] = logp.gather(-1, token[:, None]).squeeze(-1)[live]
        mask[live, t] = 1.0
        done |= token == EOS
        if done.all():
            break
        out, state = policy.gru(policy.embed(token[:, None]), state)
        last = policy.head(out[:, 0])
    return Rollout(responses, mask, log_probs, done)
