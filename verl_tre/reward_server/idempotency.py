"""What the server remembers per Idempotency-Key, so that a retry of a request gets its answer instead of new work.

An entry keeps the hash of the body the key came with (a retry with another body gets 409) and one of:

* nothing yet: the first request is reading its body into a job; duplicates wait for it (:attr:`Entry.pending`);
* the job being scored: duplicates wait for its rewards with it (one scoring for all of them);
* a job whose clients all left, or that finished unanswered: the rewards it has (its token ids are dropped:
  a retry brings the body again and scores only what is missing);
* the answer sent (the response's JSON bytes).

Inputs are never kept for retries: an entry costs its answer's bytes, or 32 bytes per reward of a kept job,
plus its key and a fixed overhead, and all entries together stay within ``max_bytes``, the oldest settled
ones dropped first. Settled entries (answered, or a job that no one waits for) also go ``ttl_s`` after they
were created. Entries still being admitted or scored stay: their inputs are the queue's, which
``max_queue_tokens`` bounds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from .batching import Job

# Python objects of one entry besides its answer and key (the entry, its dict slot, the digest: 367 bytes),
# and of a kept job besides its rewards (1,210 bytes); measured with tracemalloc on CPython 3.11, and checked
# by a test.
ENTRY_BYTES = 400
JOB_BYTES = 1300
REWARD_BYTES = 32  # a list slot and a float


class Entry:
    """One key's state. While a request is being admitted for it, ``pending`` is an Event that is set once
    ``job`` is there or ``error`` says why there is none (then it is dropped: an Event costs 700 bytes)."""

    __slots__ = ("fingerprint", "created", "job", "answer", "error", "pending", "size")

    def __init__(self, fingerprint: bytes, created: float):
        self.fingerprint = fingerprint
        self.created = created
        self.job: Job | None = None
        self.answer: bytes | None = None
        self.error: BaseException | None = None
        self.pending: asyncio.Event | None = asyncio.Event()
        self.size = 0

    @property
    def settled(self) -> bool:
        """Answered, or a job that is done or abandoned: nothing is in flight for it."""
        if self.answer is not None:
            return True
        job = self.job
        return self.pending is None and job is not None and (job.finished or job.cancelled)

    async def wait_admitted(self) -> Job:
        """The job, once the request that brought it was admitted; raises what refused that request."""
        if self.pending is not None:
            await self.pending.wait()
        if self.error is not None:
            raise self.error
        return self.job

    def _admission_over(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.set()


class IdempotencyCache:
    """Entries by key, oldest first, within ``max_bytes`` (see the module's docstring)."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())

    def get(self, key: str) -> Entry | None:
        self._evict()
        return self._entries.get(key)

    def begin(self, key: str, fingerprint: bytes) -> Entry:
        """A new entry for a request that is about to be admitted."""
        entry = Entry(fingerprint, time.monotonic())
        self._entries[key] = entry
        self._resize(key, entry)
        return entry

    def readmit(self, entry: Entry) -> None:
        """An abandoned entry's job is being admitted again: duplicates wait for that as for a new one."""
        entry.pending = asyncio.Event()

    def admitted(self, key: str, entry: Entry, job: Job) -> None:
        entry.job = job
        entry._admission_over()
        self._resize(key, entry)

    def refused(self, key: str, entry: Entry, error: BaseException) -> None:
        """Admission failed: waiting duplicates get ``error``, and the key is free for a new try."""
        entry.error = error
        entry._admission_over()
        self.drop(key, entry)

    def answered(self, key: str, entry: Entry, answer: bytes) -> None:
        """Keep the answer in place of the job."""
        entry.answer = answer
        entry.job = None
        self._resize(key, entry)

    def changed(self, key: str, entry: Entry) -> None:
        """The entry's job was cancelled or finished: recount it."""
        self._resize(key, entry)

    def drop(self, key: str, entry: Entry) -> None:
        """Forget ``entry`` (not a newer entry of the same key)."""
        if self._entries.get(key) is entry:
            del self._entries[key]
            self.bytes -= entry.size

    def _resize(self, key: str, entry: Entry) -> None:
        if self._entries.get(key) is not entry:
            return  # dropped meanwhile
        size = ENTRY_BYTES + len(key)
        if entry.answer is not None:
            size += len(entry.answer)
        elif entry.job is not None:
            size += JOB_BYTES + REWARD_BYTES * len(entry.job.results)
        self.bytes += size - entry.size
        entry.size = size
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while True:
            victim = None
            for key, entry in self._entries.items():  # oldest first; entries in flight are skipped
                if not entry.settled:
                    continue
                if self.bytes > self.max_bytes or now - entry.created >= self.ttl_s:
                    victim = key, entry
                break
            if victim is None:
                return
            self.drop(*victim)
