"""Tokenizing requests so that a big one does not hold the others up.

A request's pairs are tokenized in pieces of at most ``piece_chars`` characters (about a forward pass of
text), and the pieces of concurrent requests take turns in arrival order: a small request waits for at most
one piece of a big one, not for all of it. A single pair longer than ``piece_chars`` (truncation will cut
most of it, but its tokens cannot be computed in parts without changing them) is tokenized alone in a second
lane, so it holds up only other such pairs; bodies too big to decode in passing are decoded in that lane
too. Everything runs in worker threads (the Rust tokenizer releases the GIL and encodes from several
threads at once), one piece per lane at a time, which also bounds memory: a piece's temporary encodings
(hundreds of bytes per token) are freed before the next piece starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

from .encoding import Encoded, PairEncoder

T = TypeVar("T")


class FairTokenizer:
    """One encoder, two lanes, each a first-come-first-served turn (asyncio.Lock wakes waiters in order and
    lets no one jump the queue)."""

    def __init__(self, encoder: PairEncoder, piece_chars: int):
        self.encoder = encoder
        self.piece_chars = piece_chars
        self._regular = asyncio.Lock()
        self._bulk = asyncio.Lock()

    def pieces(self, prompts: list[str], responses: list[str]) -> Iterator[tuple[int, int, bool]]:
        """(start, stop, bulk) slices in order: consecutive pairs within ``piece_chars`` characters together,
        each longer pair alone with bulk=True."""
        start, chars = 0, 0
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            size = len(prompt) + len(response)
            if size > self.piece_chars:
                if start < i:
                    yield start, i, False
                yield i, i + 1, True
                start, chars = i + 1, 0
            elif chars + size > self.piece_chars:
                yield start, i, False
                start, chars = i, size
            else:
                chars += size
        if start < len(prompts):
            yield start, len(prompts), False

    async def encode(self, prompts: list[str], responses: list[str]) -> list[Encoded]:
        """PairEncoder.encode of all pairs, in order, piece by piece."""
        encoded: list[Encoded] = []
        for start, stop, bulk in self.pieces(prompts, responses):
            async with self._bulk if bulk else self._regular:
                encoded += await asyncio.to_thread(self.encoder.encode, prompts[start:stop], responses[start:stop])
        return encoded

    async def in_bulk_lane(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in a worker thread, in turn with the bulk lane's pairs (for decoding big bodies)."""
        async with self._bulk:
            return await asyncio.to_thread(fn, *args)
