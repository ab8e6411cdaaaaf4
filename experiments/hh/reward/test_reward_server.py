"""Smoke client for a running HH reward server: checks /health, scores a few pairs, checks the answers.

    REWARD_SERVER_URL=http://127.0.0.1:8888/predict python experiments/hh/reward/test_reward_server.py

Token from REWARD_SERVER_TOKEN. Exits 0 when the server is ready, accepts the token, answers every pair in order,
and gives the same reward to a pair whether it comes alone or in a batch; prints what it saw either way.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from verl_tre.utils.reward_score.hh import DEFAULT_URL, RewardServerError, check_reward_server, score_batch

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I don't know, maybe bananas."),
    ("Write a haiku about autumn.",
     "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow."),
    ("Write a haiku about autumn.", "no"),
    ("Explain recursion briefly.", "Recursion is when a function calls itself on a smaller part of the problem "
                                   "until it reaches a base case it can answer directly."),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("REWARD_SERVER_URL", DEFAULT_URL), help="the /predict URL")
    p.add_argument("--retries", type=int, default=3, help="retries per request while the server is down")
    args = p.parse_args(argv)

    token = os.environ.get("REWARD_SERVER_TOKEN")
    try:
        health = check_reward_server(args.url, token=token or "")  # ready, and the token (if needed) accepted
        print(f"health: ready={health.get('ready')} model={health.get('model')} devices={health.get('devices')} "
              f"limits={health.get('limits')}")
        prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
        start = time.perf_counter()
        batched = score_batch(prompts, responses, url=args.url, token=token, max_retries=args.retries)
        elapsed = time.perf_counter() - start
        alone = score_batch(prompts, responses, url=args.url, token=token, max_retries=args.retries, batch_size=1)
    except (ValueError, RewardServerError) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    for (prompt, response), reward in zip(PAIRS, batched):
        print(f"{reward:+.4f}  {prompt[:40]!r} -> {response[:50]!r}")
    print(f"{len(PAIRS)} pairs in {elapsed * 1000:.1f} ms")
    # bf16 on a GPU: padding changes the kernels' summation order, worth a few hundredths on a reward.
    problems = [f"pair {i}: batched {b:.6f} vs alone {a:.6f}" for i, (b, a) in enumerate(zip(batched, alone))
                if not (math.isfinite(b) and math.isclose(b, a, rel_tol=2e-2, abs_tol=5e-2))]
    if problems:
        print("FAILED: batched and single rewards differ: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
