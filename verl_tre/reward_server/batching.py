"""Length-aware dynamic batching across concurrent requests, one worker per replica.

A request becomes a :class:`Job` whose items (token-id lists) wait in one shared queue. Each replica's
worker repeatedly takes the oldest waiting item and the items of similar length (within a factor
``SIMILAR``), oldest first, while ``rows x longest row`` stays within ``batch_tokens``, and scores them in one
forward pass in a thread (the event loop stays free for /health and new requests). So items of different
requests share passes, and a short item is never padded to a long one.

An item longer than ``chunk_tokens`` is scored on its own, ``chunk_tokens`` at a time through the model's
KV cache, one chunk per step; while shorter items wait, these steps get ``LONG_SHARE`` of the worker's time.
A long item thus delays a short one by at most one chunk, not by its whole forward pass.

A job that is cancelled (its client went away) leaves the queue at once; what was already scored is kept
with the job, so a retry of the same request (same Idempotency-Key, see app.py) scores only the rest. A job
drops its token ids once it is finished, failed or cancelled (a retry brings its body again).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# Items whose lengths differ by at most this factor may share a forward pass (padding waste below 1.5x).
SIMILAR = 1.5
# While short items wait, long items' chunks get this share of a worker's time (and all of it otherwise).
LONG_SHARE = 1 / 3


class Scorer(Protocol):
    def score(self, batch: list[list[int]]) -> list[float]: ...


class ShuttingDown(RuntimeError):
    """Set on jobs still waiting when the server stops."""


class Job:
    """One request's items; ``results[i]`` is filled as item ``i`` is scored. Await :meth:`wait`. ``ids`` is
    None once the job no longer needs them (see :meth:`release_inputs`); set it again before resubmitting."""

    def __init__(self, ids: list[list[int]]):
        self.ids: list[list[int]] | None = ids
        self.tokens = sum(map(len, ids))
        self.results: list[float | None] = [None] * len(ids)
        self.missing = len(ids)
        self.error: BaseException | None = None
        self.cancelled = False
        self.waiters = 0  # requests (the first and its retries) waiting for this job right now
        self.truncation: dict[str, int] = {}  # what the encoder cut (app.py reports it)
        self.cut = 0  # items with any token cut
        self._done = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _set(self, index: int, value: float) -> None:
        if self.results[index] is None:
            self.results[index] = value
            self.missing -= 1
            if self.missing == 0:
                self._done.set()

    def _fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def release_inputs(self) -> None:
        """Drop the token ids: scored items no longer need them, and items in a forward pass hold their own."""
        self.ids = None

    async def wait(self) -> list[float]:
        """The rewards in input order; raises the job's error (scoring failed, server shutting down)."""
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return list(self.results)


class _Item:
    __slots__ = ("job", "index", "length", "seq")

    def __init__(self, job: Job, index: int, seq: int):
        self.job, self.index, self.length, self.seq = job, index, len(job.ids[index]), seq

    @property
    def ids(self) -> list[int]:
        return self.job.ids[self.index]

    @property
    def live(self) -> bool:
        return not self.job.cancelled and not self.job.finished and self.job.results[self.index] is None


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


class LengthAwareBatcher:
    """Must be started and closed inside the event loop that calls ``submit``.

    ``chunk_tokens``: items longer than this are scored alone in chunks (scorers with a ``prefill(ids,
    chunk_tokens)`` method, see replicas.py; others score them whole, alone).
    """

    def __init__(self, scorers: list[Scorer], batch_tokens: int, chunk_tokens: int | None = None):
        self.scorers = scorers
        self.batch_tokens = batch_tokens
        self.chunk_tokens = chunk_tokens or batch_tokens
        self._short: list[tuple[int, int, _Item]] = []  # sorted by (length, arrival)
        self._long: list[_Item] = []  # arrival order
        self._seq = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self._active: dict[int, tuple[_Item, object]] = {}  # worker -> long item being prefilled, its state
        self._running: set[_Item] = set()  # in a forward pass right now
        self._jobs: set[Job] = set()
        self.forward_passes = 0
        self.tokens_per_s: float | None = None  # moving average over passes: Retry-After estimates

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._workers = [asyncio.create_task(self._work(i, s), name=f"replica-{i}") for i, s in enumerate(self.scorers)]

    @property
    def queued_tokens(self) -> int:
        """Tokens waiting to be scored (items in flight included)."""
        return sum(job.tokens for job in self._jobs)

    def drain_estimate_s(self, extra_tokens: int = 0) -> float:
        """Seconds until the queue (plus ``extra_tokens``) is scored at the recent rate."""
        rate = self.tokens_per_s or 2000.0
        return (self.queued_tokens + extra_tokens) / rate

    def submit(self, job: Job) -> None:
        """Queue the job's items that have no result yet (all of a new job; the rest of a resumed one)."""
        job.cancelled = False
        self._jobs.add(job)
        have = {item.index for item in self._all_queued() if item.job is job}
        for index, result in enumerate(job.results):
            if result is None and index not in have:
                item = _Item(job, index, next(self._seq))
                if item.length > self.chunk_tokens:
                    self._long.append(item)
                else:
                    bisect.insort(self._short, (item.length, item.seq, item))
        self._wakeup.set()

    def cancel(self, job: Job) -> None:
        """Drop the job's waiting items (a long one being prefilled stops at its next chunk) and its ids."""
        job.cancelled = True
        job.release_inputs()
        self._short = [entry for entry in self._short if entry[2].job is not job]
        self._long = [item for item in self._long if item.job is not job]
        self._jobs.discard(job)

    def fail_all(self, error: BaseException) -> None:
        """Fail every job not finished (their requests answer with ``error``); the queue empties."""
        for job in list(self._jobs):
            job._fail(error)
            job.release_inputs()
        self._jobs.clear()
        self._short.clear()
        self._long.clear()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self.fail_all(ShuttingDown("the reward server is shutting down; retry"))

    def _all_queued(self):
        yield from (entry[2] for entry in self._short)
        yield from self._long
        yield from (item for item, _ in self._active.values())
        yield from self._running

    def _take_short(self) -> list[_Item]:
        """The oldest item and, oldest first, items of similar length within the token budget."""
        self._short = [entry for entry in self._short if entry[2].live]
        if not self._short:
            return []
        anchor = min(self._short, key=lambda entry: entry[1])[2]
        lo = bisect.bisect_left(self._short, (anchor.length / SIMILAR, -1))
        hi = bisect.bisect_right(self._short, (anchor.length * SIMILAR, float("inf")))
        candidates = sorted(self._short[lo:hi], key=lambda entry: entry[1])
        taken, width = [], 0
        for entry in candidates:
            new_width = max(width, entry[0])
            if taken and new_width * (len(taken) + 1) > self.batch_tokens:
                continue  # a shorter, younger item may still fit
            taken.append(entry)
            width = new_width
        chosen = {id(entry) for entry in taken}
        self._short = [entry for entry in self._short if id(entry) not in chosen]
        return [entry[2] for entry in taken]

    def _next_long(self) -> _Item | None:
        while self._long:
            item = self._long.pop(0)
            if item.live:
                return item
        return None

    def _record(self, tokens: int, elapsed: float) -> None:
        self.forward_passes += 1
        rate = tokens / max(elapsed, 1e-6)
        self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate

    def _finish(self, job: Job) -> None:
        if job.finished:
            self._jobs.discard(job)
            job.release_inputs()

    async def _work(self, worker: int, scorer: Scorer) -> None:
        credit = 0.0  # seconds of long steps this worker may still run while short items wait
        while True:
            while not (self._short or self._long or worker in self._active):
                self._wakeup.clear()
                await self._wakeup.wait()
            has_long = worker in self._active or bool(self._long)
            if has_long and (credit > 0 or not self._short):
                start = time.perf_counter()
                contended = bool(self._short)
                await self._long_step(worker, scorer)
                if contended:
                    credit -= time.perf_counter() - start
                continue
            start = time.perf_counter()
            items = self._take_short()
            if items:
                await self._score_short(scorer, items)
            if has_long:
                # Bounded, so that time spent while no long item waited is not saved up for a burst.
                credit = min(credit + (time.perf_counter() - start) * LONG_SHARE / (1 - LONG_SHARE), 1.0)

    async def _score_short(self, scorer: Scorer, items: list[_Item]) -> None:
        start = time.perf_counter()
        self._running.update(items)
        try:
            rewards = await asyncio.to_thread(score_splitting_on_oom, scorer, [item.ids for item in items])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the requests fail; the worker and the server live on
            log.exception("scoring %d items failed", len(items))
            for item in items:
                item.job._fail(exc)
                self._finish(item.job)
            return
        finally:
            self._running.difference_update(items)
        self._record(sum(item.length for item in items), time.perf_counter() - start)
        for item, reward in zip(items, rewards):
            item.job._set(item.index, reward)  # kept even if the job was cancelled meanwhile: a retry reuses it
            self._finish(item.job)

    async def _long_step(self, worker: int, scorer: Scorer) -> None:
        if worker not in self._active:
            item = self._next_long()
            if item is None:
                return
            prefill = getattr(scorer, "prefill", None)
            self._active[worker] = (item, prefill(item.ids, self.chunk_tokens) if prefill else None)
        item, state = self._active[worker]
        if not item.live:  # the client went away: drop the rest of this item
            del self._active[worker]
            return
        start = time.perf_counter()
        try:
            if state is None:
                reward = (await asyncio.to_thread(score_splitting_on_oom, scorer, [item.ids]))[0]
                tokens = item.length
            else:
                reward = await asyncio.to_thread(state.step)
                tokens = min(self.chunk_tokens, item.length)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("scoring an item of %d tokens failed", item.length)
            del self._active[worker]
            item.job._fail(exc)
            self._finish(item.job)
            return
        self._record(tokens, time.perf_counter() - start)
        if reward is not None:
            del self._active[worker]
            item.job._set(item.index, reward)
            self._finish(item.job)
