"""Sampling metrics over the n responses of one prompt.

All functions take the per-sample values of a single prompt, in the order they were generated, and
return one float; averaging over prompts is the caller's job (see :mod:`verl_tre.eval.evaluate`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence

# Above this many k-subsets maj@k is estimated from random subsets instead of enumerated exactly.
MAJ_EXACT_LIMIT = 5_000
MAJ_SAMPLES = 5_000


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} samples available for this prompt; generate at least k samples per prompt or lower k")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from ``n`` samples of which ``c`` are correct.

    The probability that a uniformly random k-subset of the n samples holds at least one correct one:
    ``1 - C(n - c, k) / C(n, k)``. Python's integer binomials and correctly rounded int/int division keep
    it exact to one rounding for any n, where the float-product form loses digits for large n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must lie in [0, n={n}]")
    _check_k(k, n)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def avg_at_k(scores: Sequence[float], k: int) -> float:
    """avg@k: mean score of the first ``k`` samples, what a run generating exactly k samples reports.

    Its expectation over sample orders is the mean over all n samples; the first-k form keeps the value
    comparable with runs that sampled only k.
    """
    _check_k(k, len(scores))
    return float(sum(scores[:k]) / k)


def _vote(answers: Sequence[str | None], scores: Sequence[float], idx: Sequence[int]) -> float:
    """Score of the majority answer among ``idx``; ties count as a uniform draw among the tied answers."""
    counts = Counter(answers[i] for i in idx if answers[i] is not None)
    if not counts:
        return 0.0  # nobody gave an extractable answer: no vote can be right
    top = max(counts.values())
    winners = [a for a, m in counts.items() if m == top]
    per_answer = []
    for a in winners:
        # Samples sharing an answer share its score under a deterministic grader; averaging guards the rest.
        vals = [scores[i] for i in idx if answers[i] == a]
        per_answer.append(sum(vals) / len(vals))
    return sum(per_answer) / len(per_answer)


def maj_at_k(answers: Sequence[str | None], scores: Sequence[float], k: int, seed: int = 0) -> float:
    """maj@k: expected score of the majority-vote answer of a uniformly random k-subset of the samples.

    ``answers[i]`` is sample i's extracted final answer (None when none could be extracted: it abstains),
    ``scores[i]`` its score. Exact by enumeration while C(n, k) <= MAJ_EXACT_LIMIT, otherwise the mean over
    MAJ_SAMPLES random subsets drawn with ``seed``.
    """
    n = len(scores)
    if len(answers) != n:
        raise ValueError(f"got {len(answers)} answers for {n} scores; pass one answer (or None) per sample")
    _check_k(k, n)
    if math.comb(n, k) <= MAJ_EXACT_LIMIT:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MAJ_SAMPLES)]
    return sum(_vote(answers, scores, s) for s in subsets) / len(subsets)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself: the k values reported when none are asked for."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks
