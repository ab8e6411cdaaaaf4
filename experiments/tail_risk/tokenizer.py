"""Character tokenizer whose vocabulary is padded with never-valid tokens.

The first ids are three specials and the characters the task uses; every id above them is a placeholder that
no training example, prompt or correct answer ever contains. Padding to V = 64 or V = 4,096 changes nothing
about the task, only how much probability an entropy bonus can spread into tokens that can never be right.
"""

from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+-*/()=,;|>"
# What a never-valid id decodes to: a character outside CHARS, so a decoded response that holds one fails every
# format check downstream.
INVALID_CHAR = "?"


class CharTokenizer:
    """Maps the task's characters to ids 3..23 and reserves ids 24..V-1 as never-valid padding.

    Args:
        vocab_size: total number of ids V (the policy's output width); at least the 24 base tokens.
    """

    def __init__(self, vocab_size: int):
        base = len(SPECIALS) + len(CHARS)
        if not isinstance(vocab_size, int) or vocab_size < base:
            raise ValueError(f"vocab_size must be an integer >= {base} (specials + task characters), got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.base_size = base
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}
        self._to_char = {i: c for c, i in self._to_id.items()}

    @property
    def num_invalid(self) -> int:
        """Number of padded never-valid ids."""
        return self.vocab_size - self.base_size

    def invalid_mask(self) -> torch.Tensor:
        """[V] bool, True at the padded never-valid ids (the tail whose probability the study measures)."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.base_size :] = True
        return mask

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no specials added)."""
        try:
            return [self._to_id[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the task alphabet {CHARS!r}") from None

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first <eos> (exclusive); any other non-character id becomes '?'."""
        out = []
        for i in (int(x) for x in ids):
            if i == EOS:
                break
            out.append(self._to_char.get(i, INVALID_CHAR))
        return "".join(out)
