"""Score sampled responses with the task rewards and aggregate them per data source."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from verl_tre.data import sources
from verl_tre.eval.answers import Extractor, project_extract
from verl_tre.eval.metrics import avg_at_k, maj_at_k, pass_at_k
from verl_tre.eval.server_wait import wait_for_reward_server
from verl_tre.eval.samples import PromptSamples, min_samples

# compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float, ...}
Scorer = Callable[..., Any]
# (data_sources, solution_strs, ground_truths, extra_infos) -> one float or dict per sample, in order
BatchScorer = Callable[[list[str], list[str], list[Any], list[Any]], list[Any]]


def dispatcher_batch_scorer(**reward_kwargs: Any) -> BatchScorer:
    """The project's task reward dispatcher in its batch form (HH then reaches the reward server in batches).

    ``reward_kwargs`` are its options (e.g. ``math_verify=True``, ``hh_url=...``).
    """
    from verl_tre.utils.reward_score import compute_score

    def score(data_sources, solution_strs, ground_truths, extra_infos):
        return compute_score(
            data_sources=data_sources, solution_strs=solution_strs, ground_truths=ground_truths,
            extra_infos=extra_infos, **reward_kwargs,
        )

    return score


def _per_sample(scorer: Scorer) -> BatchScorer:
    return lambda ds, sols, gts, extras: [scorer(*args) for args in zip(ds, sols, gts, extras)]


def score_samples(
    groups: Sequence[PromptSamples],
    scorer: Scorer | None = None,
    extractor: Extractor | None = None,
    progress: bool = True,
    reward_kwargs: dict[str, Any] | None = None,
    chunk_size: int = 256,
) -> None:
    """Fill ``scores`` (and ``correct`` / ``answers`` where the scorer reports ``acc`` / ``pred``) in place.

    ``scorer`` scores one sample; by default the project's dispatcher scores ``chunk_size`` samples per call
    with ``reward_kwargs``, after waiting for the HH reward server when there are HH samples. Groups that already
    carry scores (validation dumps) are not rescored; answers missing after scoring come from ``extractor``
    (default :func:`verl_tre.eval.answers.project_extract`).
    """
    todo = [g for g in groups if g.scores is None]
    if todo:
        if scorer is None and any(g.data_source == sources.HH for g in todo):
            wait_for_reward_server(reward_kwargs, progress)
        batch = _per_sample(scorer) if scorer else dispatcher_batch_scorer(**(reward_kwargs or {}))
        flat = [(g, r) for g in todo for r in g.responses]
        outputs: list[Any] = []
        with tqdm(total=len(flat), desc="scoring", unit="resp", disable=not progress) as bar:
            for i in range(0, len(flat), chunk_size):
                part = flat[i : i + chunk_size]
                got = batch(
                    [g.data_source for g, _ in part], [r for _, r in part],
                    [g.ground_truth for g, _ in part], [g.extra_info for g, _ in part],
                )
                if len(got) != len(part):
                    raise ValueError(f"the scorer returned {len(got)} scores for {len(part)} responses")
                outputs.extend(got)
                bar.update(len(part))
        pos = 0
        for g in todo:
            scores, correct, answers = [], [], []
            for out in outputs[pos : pos + len(g.responses)]:
                if isinstance(out, dict):
                    if "score" not in out:
                        raise ValueError(f"scorer returned a dict without 'score' for {g.data_source}: {sorted(out)}")
                    scores.append(float(out["score"]))
                    correct.append(bool(out["acc"]) if "acc" in out else None)
                    answers.append(None if out.get("pred") is None else str(out["pred"]))
                else:
                    scores.append(float(out))
                    correct.append(None)
                    answers.append(None)
            pos += len(g.responses)
            g.scores = scores
            g.correct = None if any(c is None for c in correct) else correct
            g.answers = None if all(a is None for a in answers) else answers
    extractor = extractor or project_extract
    for g in groups:
        if g.answers is None:
            g.answers = [extractor(g.data_source, r) for r in g.responses]


def _correctness(groups: Sequence[PromptSamples], threshold: float | None) -> list[list[bool]] | None:
    """Per-sample correctness for pass@k: the scorer's ``acc`` if given, else ``score >= threshold``.

    Without a threshold, rewards that are all 0 or 1 count 1 as correct; any other reward (a reward
    model's score) has no notion of correct, and pass@k is not reported (None).
    """
    if all(g.correct is not None for g in groups):
        return [list(g.correct) for g in groups]
    if threshold is None:
        if not all(s in (0.0, 1.0) for g in groups for s in g.scores):
            return None
        threshold = 1.0
    return [[s >= threshold for s in g.scores] for g in groups]


def summarize(
    groups: Sequence[PromptSamples], ks: Sequence[int], threshold: float | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Metrics per data source, each the mean over its prompts; groups must be scored.

    Keys: ``prompts``, ``samples`` (per prompt, the smallest n), ``mean_reward`` (mean of all scores,
    prompts weighted equally), ``pass@k`` (unbiased; None without a notion of correct), ``avg@k`` and
    ``maj@k`` (None when no response had an extractable answer) for each k in ``ks``.
    """
    by_source: dict[str, list[PromptSamples]] = defaultdict(list)
    for g in groups:
        if g.scores is None:
            raise ValueError("summarize() needs scored samples; call score_samples() first")
        by_source[g.data_source].append(g)
    report = {}
    for ds in sorted(by_source):
        gs = by_source[ds]
        n_min = min(len(g.responses) for g in gs)
        bad = [k for k in ks if k > n_min]
        if bad:
            raise ValueError(f"{ds}: k={bad} exceed the {n_min} samples of its smallest prompt; lower k or sample more")
        correct = _correctness(gs, threshold)
        has_answers = any(a is not None for g in gs for a in (g.answers or []))
        row: dict[str, float | int | None] = {
            "prompts": len(gs),
            "samples": n_min,
            "mean_reward": float(np.mean([np.mean(g.scores) for g in gs])),
        }
        for k in ks:
            row[f"pass@{k}"] = (
                None if correct is None else float(np.mean([pass_at_k(len(c), sum(c), k) for c in correct]))
            )
        for k in ks:
            row[f"avg@{k}"] = float(np.mean([avg_at_k(g.scores, k) for g in gs]))
        for k in ks:
            row[f"maj@{k}"] = (
                float(np.mean([maj_at_k(g.answers, g.scores, k) for g in gs])) if has_answers else None
            )
        report[ds] = row
    return report


def evaluate(
    groups: Sequence[PromptSamples],
    ks: Sequence[int],
    scorer: Scorer | None = None,
    extractor: Extractor | None = None,
    threshold: float | None = None,
    progress: bool = True,
    reward_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """:func:`score_samples` then :func:`summarize`, with ``ks`` checked before any scoring."""
    n_min = min_samples(groups)
    if any(k < 1 or k > n_min for k in ks):
        raise ValueError(f"every k must lie in [1, {n_min}] (the fewest samples any prompt has), got {list(ks)}")
    score_samples(groups, scorer=scorer, extractor=extractor, progress=progress, reward_kwargs=reward_kwargs)
    return summarize(groups, ks, threshold=threshold)
