"""Dynamic batching across concurrent requests under a padded-token budget, one worker per replica.

Requests push their items onto one shared queue; each replica's worker takes items from the front while
``rows x longest row`` stays within ``batch_tokens``, scores them in a thread (the event loop stays free for
/health and new requests), and resolves each item's future. Items from several small requests thus share a
forward pass, and a request's items can be spread over several replicas.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, batch: list[list[int]]) -> list[float]: ...


class ShuttingDown(RuntimeError):
    """Raised for items still queued when the server stops."""


@dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future


def score_splitting_on_oom(scorer: Scorer, batch: list[list[int]]) -> list[float]:
    """Score ``batch``; if the device runs out of memory, score each half separately (recursively)."""
    try:
        return scorer.score(batch)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("out of memory on %d rows; retrying as %d + %d", len(batch), half, len(batch) - half)
        return score_splitting_on_oom(scorer, batch[:half]) + score_splitting_on_oom(scorer, batch[half:])


class TokenBudgetBatcher:
    """Must be started and closed inside the event loop that calls ``submit``."""

    def __init__(self, scorers: list[Scorer], batch_tokens: int):
        self.scorers = scorers
        self.batch_tokens = batch_tokens
        self._queue: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self.forward_passes = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._workers = [asyncio.create_task(self._work(s), name=f"replica-{i}") for i, s in enumerate(self.scorers)]

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the reward server is shutting down; retry"))

    async def submit(self, batch: list[list[int]]) -> list[float]:
        """Scores for ``batch`` in its order. Items go in longest-first so that neighbours pad alike."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in batch]
        for i in sorted(range(len(batch)), key=lambda i: -len(batch[i])):
            self._queue.append(_Item(batch[i], futures[i]))
        self._wakeup.set()
        results = await asyncio.gather(*futures, return_exceptions=True)  # retrieves every failure, not just one
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _take(self) -> list[_Item]:
        taken = [self._queue.popleft()]
        longest = len(taken[0].ids)
        while self._queue:
            width = max(longest, len(self._queue[0].ids))
            if width * (len(taken) + 1) > self.batch_tokens:
                break
            longest = width
            taken.append(self._queue.popleft())
        return taken

    async def _work(self, scorer: Scorer) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            items = [item for item in self._take() if not item.future.done()]  # skip abandoned requests
            if not items:
                continue
            try:
                rewards = await asyncio.to_thread(score_splitting_on_oom, scorer, [item.ids for item in items])
            except asyncio.CancelledError:
                for item in items:
                    item.future.cancel()
                raise
            except Exception as exc:  # the request fails; the worker and the server live on
                log.exception("scoring %d items failed", len(items))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.forward_passes += 1
            for item, reward in zip(items, rewards):
                if not item.future.done():
                    item.future.set_result(reward)
