"""Memory of the HH reward server: what many keyed requests leave behind, and the peak of bodies made to blow it up.

Each case starts a fresh ``python -m verl_tre.reward_server`` (the tiny random model on the CPU unless --model)
and reads the server process's VmRSS and VmHWM (peak) from /proc, against its RSS once warm and idle:

* ``keyed`` / ``unkeyed``: --requests requests of --items pairs of about --pair-words words each, from
  --clients clients, each request with its own Idempotency-Key (as the project's client sends them) or
  without: RSS growth after them; keyed minus unkeyed is what the server keeps for retries;
* ``emoji:N``: one response of N escaped emoji (``\\ud83d\\ude00``, 12 bytes each; N = 7.9M is 95 MB);
* ``empty:N``: N empty strings as prompts, one response (3 bytes each; N = 31M is 90 MB);
* ``four:MB``: four bodies of MB megabytes at once (one prompt of ASCII words);
* ``emoji-four:N``: four ``emoji:N`` bodies at once.

For the body cases it prints the peak RSS over idle, each answer's status (or the error that ended it) and
the seconds until the last answer. ``--compare-with DIR`` runs every case on the servers of other checkouts too
(each case on every server back to back).

    python benchmarks/bench_reward_server_memory.py --cases keyed unkeyed --compare-with /tmp/head_server
    python benchmarks/bench_reward_server_memory.py --cases emoji:7900000 empty:31000000 four:90
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from bench_reward_server import Server, check_compare_with, compared_servers, run_on_each, text

from verl_tre.reward_server.tiny import build_tiny_reward_model


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process ``pid`` in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values


def request_load(url: str, requests: int, items: int, words: int, clients: int, keyed: bool, seed: int) -> int:
    """Send the requests from ``clients`` threads; the number that did not answer 200."""
    failed, lock, counter = [0], threading.Lock(), iter(range(requests))

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=600, trust_env=False) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                payload = {"prompts": [text(rng, words // 2) for _ in range(items)],
                           "responses": [text(rng, words - words // 2) for _ in range(items)]}
                headers = {"Idempotency-Key": uuid.uuid4().hex} if keyed else {}
                if http.post(url, json=payload, headers=headers).status_code != 200:
                    with lock:
                        failed[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed[0]


def body_of(kind: str, size: float) -> bytes:
    """The raw body of one blow-up case."""
    if kind in ("emoji", "emoji-four"):
        return b'{"prompts": ["hi"], "responses": ["' + b"\\ud83d\\ude00" * int(size) + b'"]}'
    if kind == "empty":
        return b'{"prompts": [' + b'"",' * (int(size) - 1) + b'""], "responses": ["r"]}'
    return b'{"prompts": ["' + b"word " * int(size * 2e5) + b'"], "responses": ["r"]}'


def post_raw(url: str, body: bytes, outcome: list, index: int) -> None:
    try:
        with httpx.Client(timeout=600, trust_env=False) as http:
            r = http.post(url, content=body, headers={"Content-Type": "application/json"})
        outcome[index] = f"{r.status_code} {r.text[:90]}"
    except httpx.HTTPError as exc:
        outcome[index] = f"{type(exc).__name__} (the server closed the connection)"


def run_case(case: str, server: Server, args) -> dict:
    kind, _, size = case.partition(":")
    url = f"{server.base}/predict"
    server.start()
    try:
        request_load(url, 3, 2, 10, 1, True, args.seed)  # warm-up
        idle = memory_mb(server.proc.pid)
        row = {"server": server.label, "case": case, "idle_rss_mb": idle["VmRSS"]}
        start = time.perf_counter()
        if kind in ("keyed", "unkeyed"):
            row["failed"] = request_load(url, args.requests, args.items, args.pair_words, args.clients,
                                         kind == "keyed", args.seed)
            time.sleep(1.0)
            row["rss_growth_mb"] = memory_mb(server.proc.pid)["VmRSS"] - idle["VmRSS"]
            health = httpx.get(f"{server.base}/health", timeout=60, trust_env=False).json()
            row["idempotency_cache"] = health.get("idempotency_cache")
        else:
            body = body_of(kind, float(size))
            copies = 4 if kind in ("four", "emoji-four") else 1
            outcome = [None] * copies
            threads = [threading.Thread(target=post_raw, args=(url, body, outcome, i)) for i in range(copies)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            row.update(body_mb=len(body) / 1e6, copies=copies, answers=outcome)
        row["seconds"] = time.perf_counter() - start
        row["peak_over_idle_mb"] = memory_mb(server.proc.pid)["VmHWM"] - idle["VmRSS"]
        return row
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="reward model directory (default: build the tiny random model)")
    p.add_argument("--cases", nargs="+", default=["keyed", "unkeyed"],
                   help="keyed, unkeyed, emoji:N, empty:N, four:MB, emoji-four:N (default: %(default)s)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--items", type=int, default=32, help="pairs per request (the trainer's hh_batch_size)")
    p.add_argument("--pair-words", type=int, default=200, help="words (= tokens here) per pair")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--compare-with", nargs="+", type=Path, default=[], metavar="DIR")
    p.add_argument("--server-args", default="", help="extra server flags")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for case in args.cases:
        kind, _, size = case.partition(":")
        if kind not in ("keyed", "unkeyed", "emoji", "empty", "four", "emoji-four") or (
                kind not in ("keyed", "unkeyed") and not size.replace(".", "", 1).isdigit()):
            p.error(f"--cases {case}: use keyed, unkeyed, emoji:N, empty:N, four:MB or emoji-four:N")
    check_compare_with(p, args.compare_with)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_reward_model(Path(tmp) / "tiny_rm")
        servers = compared_servers(model, Path(tmp), args)
        try:
            results = run_on_each(servers, args.cases, lambda case, server: run_case(case, server, args))
        finally:
            for server in servers:
                server.close()
    print(f"\n{os.cpu_count()} CPU cores visible, load average {os.getloadavg()[0]:.1f}; keyed/unkeyed: "
          f"{args.requests} requests x {args.items} pairs x ~{args.pair_words} tokens, {args.clients} clients")
    print(f"{'case':>18} {'server':>12} {'idle MB':>8} {'growth MB':>9} {'peak+ MB':>9} {'s':>6}  answers")
    for r in results:
        answers = r.get("answers") or [f"failed {r.get('failed')}, cache {r.get('idempotency_cache')}"]
        growth = r.get("rss_growth_mb", float("nan"))
        print(f"{r['case']:>18} {r['server']:>12} {r['idle_rss_mb']:>8.0f} {growth:>9.0f} "
              f"{r['peak_over_idle_mb']:>9.0f} {r['seconds']:>6.1f}  {'; '.join(sorted(set(answers)))[:120]}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
