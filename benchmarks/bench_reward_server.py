"""Throughput of the HH reward server: requests/s and items/s under concurrent clients.

Starts ``python -m verl_tre.reward_server`` as a separate process on a free loopback port (the tiny random
model unless --model is given), then for each (clients, items per request) scenario sends --requests
requests from that many threads and reports requests/s, items/s and latency percentiles.

    python benchmarks/bench_reward_server.py                       # tiny model on the CPU
    python benchmarks/bench_reward_server.py --model DIR --clients 1 8 32 --items 8 64 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from verl_tre.reward_server.background import free_port, wait_until_ready
from verl_tre.reward_server.tiny import build_tiny_reward_model

WORDS = "the a reward model scores each answer to every prompt with one number while training runs".split()


def text(rng: random.Random, chars: int) -> str:
    out = []
    while sum(map(len, out)) + len(out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def run_scenario(url: str, clients: int, items: int, requests: int, prompt_chars: int, response_chars: int,
                 seed: int) -> dict:
    rng = random.Random(seed)
    payloads = [{"prompts": [text(rng, prompt_chars) for _ in range(items)],
                 "responses": [text(rng, rng.randint(response_chars // 2, response_chars)) for _ in range(items)]}
                for _ in range(requests)]
    latencies, errors, lock = [], [], threading.Lock()
    next_index = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = http.post(url, json=payloads[i])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200 or len(response.json()["rewards"]) != items:
                        errors.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients, "items_per_request": items, "requests": requests, "errors": len(errors),
        "requests_per_s": requests / wall, "items_per_s": requests * items / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="reward model directory (default: build the tiny random model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per scenario")
    p.add_argument("--items", type=int, nargs="+", default=[1, 8, 32], help="pairs per request per scenario")
    p.add_argument("--requests", type=int, default=200, help="requests per scenario (default %(default)s)")
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--response-chars", type=int, default=600, help="longest response (chars); shortest is half")
    p.add_argument("--server-args", default="", help="extra server flags, e.g. '--batch-tokens 8192'")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.clients + args.items + [args.requests]) < 1:
        p.error("--clients, --items and --requests must be positive")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_reward_model(Path(tmp) / "tiny_rm")
        port = free_port()
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "verl_tre.reward_server", "--model", str(model), "--port", str(port),
             "--log-level", "warning", "--no-access-log", "--max-items", str(max(args.items)),
             *args.server_args.split()], stdout=log, stderr=subprocess.STDOUT)
        try:
            health = wait_until_ready(f"http://127.0.0.1:{port}", 600, alive=lambda: server.poll() is None)
            url = f"http://127.0.0.1:{port}/predict"
            run_scenario(url, 1, 1, 5, args.prompt_chars, args.response_chars, args.seed)  # warm-up
            scenarios = [(c, i) for c in args.clients for i in args.items]
            results = [run_scenario(url, c, i, args.requests, args.prompt_chars, args.response_chars, args.seed)
                       for c, i in tqdm(scenarios, desc="scenarios")]
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()

    print(f"model {model} on {health['devices']} ({os.cpu_count()} CPU cores visible), "
          f"prompts ~{args.prompt_chars} chars, responses {args.response_chars // 2}-{args.response_chars} chars")
    print(f"{'clients':>7} {'items/req':>9} {'req/s':>8} {'items/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}")
    for r in results:
        print(f"{r['clients']:>7} {r['items_per_request']:>9} {r['requests_per_s']:>8.1f} {r['items_per_s']:>9.1f} "
              f"{r['latency_p50_ms']:>8.1f} {r['latency_p95_ms']:>8.1f} {r['errors']:>6}")
    if args.output:
        tmp_out = args.output.with_name(args.output.name + ".tmp")
        tmp_out.write_text(json.dumps({"devices": health["devices"], "results": results}, indent=2))
        os.replace(tmp_out, args.output)
    return results


if __name__ == "__main__":
    main()
