"""Load test of the HH reward server: throughput, latency and lost rewards under the loads a trainer meets.

Starts ``python -m verl_tre.reward_server`` as a separate process on a free loopback port (the tiny random
model unless --model is given) and runs, each for --seconds:

* ``short``: --short-clients clients in a closed loop, each request --short-items short pairs;
* ``short+long``: the same beside one client that sends one long pair per request (the pair fills
  --long-tokens): short-request p99 here against ``short`` says what a long pair costs the others;
* ``mixed``: --short-clients clients whose requests mix short pairs with long ones (each pair long with
  probability --long-fraction): requests/s is the mixed-length throughput;
* ``overload``: --overload-clients clients sending --overload-items pairs per request through the
  project's client (``score_batch``), which backs off on 503/429: every reward must arrive;
* ``restart``: --short-clients clients through ``score_batch`` while the server is stopped (SIGTERM) and
  started again mid-load: every reward must arrive and equal the reward of the same pair scored alone;
* ``keepalive``: one client on one kept-alive connection, as the project's client sends a trainer's batches,
  alternating --keepalive-requests tiny requests (one two-word pair) and as many --overload-items-pair
  requests, each with an Idempotency-Key: per-request latency, p50/p99 (an answer waiting for a delayed
  ACK shows here as +40 ms).

``--compare-with DIR [DIR ...]`` also runs every scenario against the server of other checkouts (e.g. an
older commit: ``git archive COMMIT | tar -x -C DIR``), each scenario on every server back to back, so that
old and new are measured under the same load.

"Rewards lost" counts pairs whose reward never arrived or arrived wrong: a failed request, a wrong number
of rewards, or (overload, restart) a value differing from the same pair scored again after the load.

    python benchmarks/bench_reward_server.py                       # tiny model on the CPU, about 3 minutes
    python benchmarks/bench_reward_server.py --model DIR --seconds 60 --output bench.json
    python benchmarks/bench_reward_server.py --scenarios keepalive --compare-with /tmp/old_server
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from verl_tre.reward_server.background import free_port, wait_until_ready
from verl_tre.reward_server.tiny import build_tiny_reward_model
from verl_tre.utils.reward_score.hh import score_batch

WORDS = "the a reward model scores each answer to every prompt with one number while training runs".split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def short_pair(rng: random.Random) -> tuple[str, str]:
    return text(rng, rng.randint(20, 60)), text(rng, rng.randint(40, 120))


def long_pair(rng: random.Random, tokens: int) -> tuple[str, str]:
    # One word is one token of the Qwen2.5 vocabulary here; the prompt's head is cut to fit max_length.
    return text(rng, tokens), text(rng, 200)


REPO = Path(__file__).resolve().parents[1]


class Server:
    """The server of the checkout ``source`` as a child process; ``stop`` sends SIGTERM, ``start`` starts it
    again on the same port."""

    def __init__(self, model: Path, log_path: Path, extra: list[str], source: Path = REPO):
        self.label = "this" if source == REPO else source.name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "verl_tre.reward_server", "--model", str(model), "--port", str(self.port),
                    "--log-level", "warning", "--no-access-log", *extra]
        self.source = source
        self.log = open(log_path, "a")
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(self.source))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.source, env=env)
        return wait_until_ready(self.base, 600, alive=lambda: self.proc.poll() is None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.log.close()


class Recorder:
    """Latencies per client kind, failed requests and lost rewards, shared by the client threads. With
    ``keep`` the answered pairs are kept so that their rewards can be checked afterwards."""

    def __init__(self, keep: bool = False):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.requests = 0
        self.pairs = 0
        self.lost = 0
        self.failures: list[str] = []
        self.answered: list[tuple[tuple[str, str], float]] | None = [] if keep else None

    def record(self, kind: str, pairs: list[tuple[str, str]], elapsed: float, rewards, failure: str | None) -> None:
        ok = failure is None and isinstance(rewards, list) and len(rewards) == len(pairs)
        with self.lock:
            self.latencies.setdefault(kind, []).append(elapsed)
            self.requests += 1
            self.pairs += len(pairs)
            if not ok:
                self.lost += len(pairs)
                self.failures.append(failure or "wrong number of rewards")
            elif self.answered is not None:
                self.answered.extend(zip(pairs, rewards))


def wrong_rewards(url: str, answered: list[tuple[tuple[str, str], float]], chunk: int = 64) -> int:
    """How many answered rewards differ from the same pairs scored again in a quiet server."""
    wrong = 0
    with httpx.Client(timeout=600, trust_env=False) as http:
        for start in range(0, len(answered), chunk):
            part = answered[start:start + chunk]
            again, failure = raw_post(http, url, [pair for pair, _ in part])
            if failure is not None:
                return len(answered) - start
            wrong += sum(not math.isclose(r, a, rel_tol=1e-4, abs_tol=1e-4) for (_, r), a in zip(part, again))
    return wrong


def raw_post(http: httpx.Client, url: str, pairs, headers: dict | None = None) -> tuple[list | None, str | None]:
    """One POST, no retry (the load as the server sees it)."""
    response = http.post(url, json={"prompts": [p for p, _ in pairs], "responses": [r for _, r in pairs]},
                         headers=headers)
    if response.status_code != 200:
        return None, f"HTTP {response.status_code}"
    return response.json()["rewards"], None


def project_client(url: str, pairs) -> tuple[list | None, str | None]:
    """The project's client, as the trainer calls it (retries, back-off, deadline)."""
    try:
        return score_batch([p for p, _ in pairs], [r for _, r in pairs], url=url, batch_size=len(pairs)), None
    except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure instead of stopping
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def run_clients(clients: list[tuple[str, Callable[[random.Random], list], bool]], url: str, seconds: float,
                recorder: Recorder, seed: int, during: Callable[[], None] | None = None) -> float:
    """Run closed-loop clients (kind, request maker, through the project's client?) for ``seconds``."""
    stop_at = time.monotonic() + seconds

    def loop(index: int, kind: str, make, patient: bool) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=600, trust_env=False) as http:
            while time.monotonic() < stop_at:
                pairs = make(rng)
                start = time.perf_counter()
                try:
                    rewards, failure = project_client(url, pairs) if patient else raw_post(http, url, pairs)
                except httpx.HTTPError as exc:
                    rewards, failure = None, f"{type(exc).__name__}"
                recorder.record(kind, pairs, time.perf_counter() - start, rewards, failure)

    threads = [threading.Thread(target=loop, args=(i, *c)) for i, c in enumerate(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def run_keepalive(url: str, requests: int, items: int, recorder: Recorder, seed: int) -> float:
    """Tiny and ``items``-pair requests in turn on one kept-alive connection, each with its own key."""
    rng = random.Random(seed)
    makers = [("tiny", lambda: [("hi", "hello")]), ("batch", lambda: [short_pair(rng) for _ in range(items)])]
    with httpx.Client(timeout=600, trust_env=False) as http:
        raw_post(http, url, [("hi", "hello")])  # opens the connection
        start = time.perf_counter()
        for _ in range(requests):
            for kind, make in makers:
                pairs = make()
                sent = time.perf_counter()
                rewards, failure = raw_post(http, url, pairs, headers={"Idempotency-Key": uuid.uuid4().hex})
                recorder.record(kind, pairs, time.perf_counter() - sent, rewards, failure)
        return time.perf_counter() - start


def server_counts(base: str) -> dict[str, int]:
    """The server's own counters (requests answered, refused as overloaded, deduplicated, dropped, passes)."""
    body = httpx.get(f"{base}/health", timeout=60, trust_env=False).json()
    counts = {k: v for k, v in body.get("served", {}).items() if isinstance(v, int)}
    counts["forward_passes"] = body.get("forward_passes", 0)
    return counts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(name: str, recorder: Recorder, wall: float) -> dict:
    row = {"scenario": name, "wall_s": wall, "requests": recorder.requests, "pairs": recorder.pairs,
           "requests_per_s": recorder.requests / wall, "pairs_per_s": recorder.pairs / wall,
           "rewards_lost": recorder.lost, "failed_requests": len(recorder.failures),
           "failures": sorted(set(recorder.failures))[:5]}
    for kind, values in recorder.latencies.items():
        row[f"{kind}_p50_s"] = statistics.median(values)
        row[f"{kind}_p99_s"] = percentile(values, 0.99)
        row[f"{kind}_requests"] = len(values)
    return row


def check_compare_with(p: argparse.ArgumentParser, sources: list[Path]) -> None:
    """An argparse error for a --compare-with folder that holds no reward server."""
    for source in sources:
        if not (source / "verl_tre" / "reward_server" / "__main__.py").is_file():
            p.error(f"--compare-with {source}: no verl_tre/reward_server there; extract a checkout into it, e.g. "
                    f"git archive COMMIT | tar -x -C {source}")


def compared_servers(model: Path, tmp: Path, args) -> list[Server]:
    """The servers of the --compare-with checkouts, then this checkout's (not started)."""
    return [Server(model, tmp / f"server{i}.log", args.server_args.split(), source.resolve())
            for i, source in enumerate([*args.compare_with, REPO])]


def run_on_each(servers: list[Server], names: list[str], run: Callable[[str, Server], dict]) -> list[dict]:
    """``run(name, server)`` for each name on every server back to back; the rows, each printed as it comes."""
    rows = []
    for name in names:
        for server in servers:
            rows.append(run(name, server))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# The latency columns of each scenario's table row: (first kind, second kind).
TABLE_KINDS = {"short": ("short", None), "short+long": ("short", "long"), "mixed": ("mixed", None),
               "overload": ("overload", None), "restart": ("restart", None), "keepalive": ("tiny", "batch")}


def run_scenario(name: str, server: Server, args, recorder: Recorder) -> dict:
    """One scenario against one server: its summary row."""
    url = f"{server.base}/predict"
    short = ("short", lambda rng: [short_pair(rng) for _ in range(args.short_items)], False)
    long = ("long", lambda rng: [long_pair(rng, args.long_tokens)], False)
    mixed = ("mixed", lambda rng: [long_pair(rng, args.long_tokens) if rng.random() < args.long_fraction
                                   else short_pair(rng) for _ in range(args.mixed_items)], False)
    during = None
    if name == "short":
        clients = [short] * args.short_clients
    elif name == "short+long":
        clients = [short] * args.short_clients + [long]
    elif name == "mixed":
        clients = [mixed] * args.short_clients
    elif name == "overload":
        clients = [("overload", lambda rng: [short_pair(rng) for _ in range(args.overload_items)],
                    True)] * args.overload_clients
    else:
        clients = [("restart", short[1], True)] * args.short_clients

        def during() -> None:
            time.sleep(args.seconds / 3)
            server.stop()
            server.start()
    before = server_counts(server.base)
    if name == "keepalive":
        wall = run_keepalive(url, args.keepalive_requests, args.overload_items, recorder, args.seed)
    else:
        wall = run_clients(clients, url, args.seconds, recorder, args.seed, during)
    row = {"server": server.label, **summary(name, recorder, wall)}
    after = server_counts(server.base)
    if name != "restart":  # a restarted server counts from zero
        row["server_counts"] = {k: after[k] - before.get(k, 0) for k in after}
    if recorder.answered is not None:  # answered but wrong (lost or mixed up) counts as lost
        row["rewards_wrong"] = wrong_rewards(url, recorder.answered)
        row["rewards_lost"] += row["rewards_wrong"]
    return row


def print_table(results: list[dict]) -> None:
    print(f"{'scenario':>10} {'server':>12} {'req/s':>7} {'pairs/s':>8} {'kind':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'kind':>8} {'p50 s':>7} {'p99 s':>7} {'failed':>6} {'lost':>5}")
    for r in results:
        first, second = TABLE_KINDS[r["scenario"]]
        cells = []
        for kind in (first, second):
            cells.append(f"{kind or '':>8} {r.get(f'{kind}_p50_s', float('nan')):>7.4f} "
                         f"{r.get(f'{kind}_p99_s', float('nan')):>7.4f}")
        print(f"{r['scenario']:>10} {r['server']:>12} {r['requests_per_s']:>7.2f} {r['pairs_per_s']:>8.1f} "
              f"{cells[0]} {cells[1]} {r['failed_requests']:>6} {r['rewards_lost']:>5}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="reward model directory (default: build the tiny random model)")
    p.add_argument("--scenarios", nargs="+", default=list(TABLE_KINDS), choices=list(TABLE_KINDS))
    p.add_argument("--seconds", type=float, default=25.0, help="load duration per scenario (default %(default)s)")
    p.add_argument("--short-clients", type=int, default=8)
    p.add_argument("--short-items", type=int, default=4, help="pairs per short request")
    p.add_argument("--long-tokens", type=int, default=4096, help="tokens of a long pair (max_length cuts it)")
    p.add_argument("--long-fraction", type=float, default=0.1, help="share of long pairs in the mixed load")
    p.add_argument("--mixed-items", type=int, default=8, help="pairs per request in the mixed load")
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-items", type=int, default=32, help="pairs per overload and keepalive batch request "
                                                                  "(the trainer's hh_batch_size)")
    p.add_argument("--keepalive-requests", type=int, default=200, help="tiny and batch requests each, keepalive")
    p.add_argument("--compare-with", nargs="+", type=Path, default=[], metavar="DIR",
                   help="checkouts whose servers run every scenario too, right before this one's")
    p.add_argument("--server-args", default="", help="extra server flags, e.g. '--batch-tokens 8192'")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_compare_with(p, args.compare_with)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_reward_model(Path(tmp) / "tiny_rm")
        servers = compared_servers(model, Path(tmp), args)
        try:
            for server in servers:
                health = server.start()
                run_clients([("short", lambda rng: [short_pair(rng) for _ in range(args.short_items)], False)],
                            f"{server.base}/predict", 3.0, Recorder(), args.seed)  # warm-up
            results = run_on_each(servers, args.scenarios, lambda name, server: run_scenario(
                name, server, args, Recorder(keep=name in ("overload", "restart"))))
        finally:
            for server in servers:
                server.close()

    print(f"\nmodel {model} on {health['devices']} ({os.cpu_count()} CPU cores visible, load average "
          f"{os.getloadavg()[0]:.1f}), {args.seconds:.0f} s per scenario, {args.short_clients} short clients x "
          f"{args.short_items} pairs, long pair {args.long_tokens} tokens, keepalive {args.keepalive_requests} x "
          f"(tiny, {args.overload_items} pairs)")
    print_table(results)
    if args.output:
        tmp_out = args.output.with_name(args.output.name + ".tmp")
        tmp_out.write_text(json.dumps({"devices": health["devices"], "args": vars(args) | {"model": str(model)},
                                       "results": results}, indent=2, default=str))
        os.replace(tmp_out, args.output)
    return results


if __name__ == "__main__":
    main()
