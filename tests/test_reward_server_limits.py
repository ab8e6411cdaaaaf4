"""The HH reward server's latency on a kept-alive connection, the memory it keeps for Idempotency-Keys, the
limits checked before a body is decoded, coalesced duplicates, and tokenization that does not stall others.
Scorers are fakes; the encoder and tokenizer are real."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
import tracemalloc

import httpx
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st
from reward_server_fixtures import SlowScorer, body, fake_loader, health, model_dir, running, tokenizer  # noqa: F401

from verl_tre.reward_server.background import free_port
from verl_tre.reward_server.batching import Job
from verl_tre.reward_server.encoding import PairEncoder
from verl_tre.reward_server.idempotency import ENTRY_BYTES, IdempotencyCache
from verl_tre.reward_server.payload import count_strings
from verl_tre.reward_server.settings import ServerSettings

SMALL = dict(max_length=64, batch_tokens=64, chunk_tokens=64)


def _server_side_nodelay(port: int) -> list[int]:
    """TCP_NODELAY of every accepted socket of this process on ``port`` (found through /proc/self/fd)."""
    values = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == port:
                    sock.getpeername()  # the listening socket has no peer
                    values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:
                pass
    return values


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to find the server's sockets")
def test_accepted_connections_have_nagle_off(model_dir, tokenizer):
    """Nagle on a kept-alive connection makes each answer wait for the client's delayed ACK (~40 ms)."""
    settings = ServerSettings(model_path=model_dir, port=free_port(), **SMALL)
    with running(settings, loader=fake_loader(tokenizer, SlowScorer(0))) as server:
        with httpx.Client(trust_env=False, timeout=30) as http:
            for _ in range(2):  # the same connection twice
                assert http.post(f"{server.base}/predict", json=body(["p"], ["r"])).status_code == 200
            nodelay = _server_side_nodelay(settings.port)
    assert nodelay and all(nodelay), nodelay


def test_idempotency_cache_keeps_answers_not_token_ids_within_its_bytes(model_dir, tokenizer):
    scorer = SlowScorer(0)
    settings = ServerSettings(model_path=model_dir, port=free_port(), idempotency_cache_bytes=8 * ENTRY_BYTES,
                              **SMALL)
    with running(settings, loader=fake_loader(tokenizer, scorer)) as server:
        url, cache = f"{server.base}/predict", server.reward_state.jobs
        answers = {}
        for i in range(20):
            key = f"key-{i:02d}"
            r = httpx.post(url, json=body([f"q{i} " * 5] * 4, [f"a{i}"] * 4), headers={"Idempotency-Key": key},
                           timeout=30)
            assert r.status_code == 200
            answers[key] = r.content
        kept = cache.entries()
        assert 0 < len(kept) < 20 and cache.bytes <= settings.idempotency_cache_bytes
        assert [k for k, _ in kept] == sorted(answers)[-len(kept):]  # the oldest went first
        for key, entry in kept:
            assert entry.job is None and entry.answer == answers[key]  # the answer, nothing of the input
        assert cache.bytes == sum(ENTRY_BYTES + len(k) + len(answers[k]) for k, _ in kept)
        assert health(server.base)["idempotency_cache"] == {"entries": len(kept), "bytes": cache.bytes}

        # A request whose client left keeps its rewards so far, not its token ids; the retry scores the rest.
        scorer.delay_s = 0.1
        prompts, responses = [f"question {i} " + "word " * 12 for i in range(10)], ["answer"] * 10
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body(prompts, responses), headers={"Idempotency-Key": "left"}, timeout=0.4)
        time.sleep(0.3)
        abandoned = dict(cache.entries())["left"]
        # How many rows were scored before the client left depends on the machine's load (none, on a busy one).
        assert abandoned.job.cancelled and abandoned.job.ids is None and 0 <= scorer.rows - 80 < 10
        again = httpx.post(url, json=body(prompts, responses), headers={"Idempotency-Key": "left"}, timeout=30)
        assert again.status_code == 200 and scorer.rows == 90  # each pair scored once over both tries


@pytest.mark.parametrize("answered", [True, False], ids=["answered", "abandoned"])
def test_cache_accounting_covers_what_its_entries_take(answered):
    """The accounted bytes are honest: the traced memory of 2,000 entries (answered, or abandoned jobs with
    their rewards and no ids) stays within them, and not far below."""
    answer = json.dumps({"rewards": [0.123456789] * 32, "truncation": {"prompts": 0}}).encode()
    cache = IdempotencyCache(max_bytes=1 << 40, ttl_s=600)
    rng = random.Random(0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(2000):
        key = f"{i:032x}"
        entry = cache.begin(key, bytes(bytearray(32)))
        job = Job([[1, 2, 3]] * 32)
        for index in range(32):
            job._set(index, rng.random())
        job.release_inputs()
        cache.admitted(key, entry, job)
        if answered:
            cache.answered(key, entry, bytes(bytearray(answer)))  # its own object, as each answer is
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(cache) == 2000
    assert 0.75 * cache.bytes < used <= cache.bytes


class SlowEncoder(PairEncoder):
    """The real encoder, 0.5 s slower per call: concurrent duplicates arrive while the first is admitted."""

    def encode(self, prompts, responses):
        time.sleep(0.5)
        return super().encode(prompts, responses)


def test_concurrent_duplicates_wait_for_the_first_and_are_scored_once(model_dir, tokenizer):
    scorer = SlowScorer(0.02)
    settings = ServerSettings(model_path=model_dir, port=free_port(), **SMALL)
    with running(settings, loader=fake_loader(tokenizer, scorer, encoder=SlowEncoder)) as server:
        prompts, responses = [f"question {i} " + "word " * 12 for i in range(6)], ["answer"] * 6
        answers = [None] * 8

        def send(i):
            answers[i] = httpx.post(f"{server.base}/predict", json=body(prompts, responses), timeout=60,
                                    headers={"Idempotency-Key": "one-key"})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(a.status_code == 200 for a in answers)
        assert len({a.content for a in answers}) == 1
        assert scorer.rows == 6  # one scoring for eight requests
        assert health(server.base)["served"]["deduplicated"] == 7


# Strings whose JSON escapes include backslashes and quotes in every position.
_tricky = st.lists(st.sampled_from(['\\', '"', 'a', '\n', '\u00e9', '\U0001F600', '\\"', '\\\\', '/', '\ud800']),
                  max_size=12).map("".join)


@hyp_settings(max_examples=200, deadline=None)
@given(prompts=st.lists(_tricky, max_size=6), responses=st.lists(_tricky, max_size=6), ascii_only=st.booleans())
def test_strings_are_counted_exactly_without_decoding(prompts, responses, ascii_only):
    raw = json.dumps({"prompts": prompts, "responses": responses}, ensure_ascii=ascii_only)
    assert count_strings(raw.encode("utf-8", "surrogatepass")) == 2 + len(prompts) + len(responses)


class RecordingEncoder(PairEncoder):
    """The real encoder, recording when each call (one piece of pairs) ends, and telling when one begins."""

    calls: list[tuple[float, int]] = []
    began = threading.Event()

    def encode(self, prompts, responses):
        RecordingEncoder.began.set()
        out = super().encode(prompts, responses)
        RecordingEncoder.calls.append((time.perf_counter(), sum(map(len, prompts)) + sum(map(len, responses))))
        return out


@pytest.mark.parametrize("huge", [
    pytest.param([("Context: " + "many plain words " * 220, "an answer")] * 400, id="400 pairs of 3.7k chars"),
    pytest.param([("Context: " + "many plain words " * 60_000, "an answer")], id="one pair of 1M chars"),
])
def test_a_small_request_is_not_held_up_by_a_huge_one_being_tokenized(model_dir, tokenizer, huge):
    settings = ServerSettings(model_path=model_dir, port=free_port(), max_items=1024, max_chars=3_000_000,
                              max_length=64, batch_tokens=4096, chunk_tokens=64)
    RecordingEncoder.calls = []
    RecordingEncoder.began.clear()
    with running(settings, loader=fake_loader(tokenizer, SlowScorer(0.05), encoder=RecordingEncoder)) as server:
        url, done = f"{server.base}/predict", {}

        def send(name, pairs):
            r = httpx.post(url, json=body([p for p, _ in pairs], [s for _, s in pairs]), timeout=120)
            done[name] = (time.perf_counter(), r.status_code)

        big = threading.Thread(target=send, args=("huge", huge))
        big.start()
        assert RecordingEncoder.began.wait(60)  # the huge request is being tokenized
        time.sleep(0.05)
        send("tiny", [("hi", "hello")])
        big.join(timeout=120)
    assert done["huge"][1] == done["tiny"][1] == 200
    huge_chars = sum(len(p) + len(r) for p, r in huge)
    last_huge_piece = max(t for t, chars in RecordingEncoder.calls if chars > 100)
    assert sum(chars for _, chars in RecordingEncoder.calls if chars > 100) == huge_chars
    assert done["tiny"][0] < done["huge"][0]
    assert done["tiny"][0] < last_huge_piece  # answered while the huge one was still being tokenized
