"""One reward entry point for verl's ``custom_reward_function``, routing on ``data_source``.

Point verl at this file::

    custom_reward_function.path=<repo>/verl_tre/utils/reward_score/__init__.py
    custom_reward_function.name=compute_score

It serves both reward managers:

* ``naive``: ``compute_score(data_source, solution_str, ground_truth, extra_info)`` -> float;
* ``batch``: ``compute_score(data_sources=[...], solution_strs=[...], ground_truths=[...], extra_infos=[...])``
  -> list of floats. Prefer it for HH: the reward server then sees batches instead of single pairs.

Options come as keyword arguments (``custom_reward_function.reward_kwargs`` or, for the batch manager,
``reward_model.reward_kwargs``); see :class:`RewardOptions`. verl imports this file under the name
``custom_module``, outside its package, so every import here is absolute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from verl_tre.data import sources
from verl_tre.utils.reward_score import arithmetic as arithmetic_reward
from verl_tre.utils.reward_score import countdown as countdown_reward
from verl_tre.utils.reward_score import hh as hh_reward
from verl_tre.utils.reward_score import math as math_reward

__all__ = ["RewardOptions", "compute_score", "known_data_sources"]


class RewardOptions(BaseModel):
    """Reward options; unknown names are an error so that a typo cannot silently change the reward."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    math_verify: bool = Field(False, description="also accept MATH answers math-verify proves equal")
    math_verify_timeout: float = Field(5.0, gt=0, description="seconds per math-verify comparison")
    hh_url: str | None = Field(None, description="reward server URL (default $REWARD_SERVER_URL)")
    hh_token: str | None = Field(None, description="bearer token (default $REWARD_SERVER_TOKEN)")
    hh_batch_size: int = Field(32, ge=1, description="pairs per HTTP request")
    hh_timeout: float = Field(120.0, gt=0, description="seconds per try of an HTTP request")
    hh_deadline: float = Field(hh_reward.DEFAULT_DEADLINE_S, gt=0,
                               description="seconds a request may take in all, waiting through loads and restarts")
    hh_max_retries: int | None = Field(None, ge=0, description="most retries per request (None: until hh_deadline)")


def known_data_sources() -> list[str]:
    """Every data_source string :func:`compute_score` can score."""
    return sorted(sources.MATH_LIKE | {sources.COUNTDOWN, sources.ARITHMETIC, sources.HH})


def _options(kwargs: dict[str, Any]) -> RewardOptions:
    try:
        return RewardOptions(**kwargs)
    except ValidationError as error:
        raise ValueError(
            f"bad reward option(s) {sorted(kwargs)}: {error}\nvalid options: {sorted(RewardOptions.model_fields)}"
        ) from error


def _hh_prompt(extra_info: Any, index: int) -> str:
    prompt = extra_info.get("prompt") if hasattr(extra_info, "get") else None
    if not isinstance(prompt, str):
        raise ValueError(
            f"HH sample {index} has no extra_info['prompt'] (the reward model scores prompt and response); "
            "prepare the data with experiments/hh/data_preprocess/hh.py"
        )
    return prompt


def _score_all(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any],
    options: RewardOptions,
) -> list[float]:
    lengths = {len(data_sources), len(solution_strs), len(ground_truths), len(extra_infos)}
    if len(lengths) != 1:
        raise ValueError(
            f"data_sources, solution_strs, ground_truths and extra_infos must have one entry per sample, "
            f"got lengths {len(data_sources)}, {len(solution_strs)}, {len(ground_truths)}, {len(extra_infos)}"
        )
    unknown = sorted({str(s) for s in data_sources} - set(known_data_sources()))
    if unknown:
        raise ValueError(f"no reward for data_source {unknown}; known: {known_data_sources()}")

    scores: list[float | None] = [None] * len(data_sources)
    hh_indices = []
    for i, (source, solution, truth) in enumerate(zip(data_sources, solution_strs, ground_truths)):
        if source in sources.MATH_LIKE:
            scores[i] = math_reward.compute_score(
                solution, truth, use_math_verify=options.math_verify, math_verify_timeout=options.math_verify_timeout
            )
        elif source == sources.COUNTDOWN:
            scores[i] = countdown_reward.compute_score(solution, truth)
        elif source == sources.ARITHMETIC:
            scores[i] = arithmetic_reward.compute_score(solution, truth)
        else:
            hh_indices.append(i)
    if hh_indices:
        rewards = hh_reward.score_batch(
            [_hh_prompt(extra_infos[i], i) for i in hh_indices],
            [solution_strs[i] for i in hh_indices],
            url=options.hh_url,
            token=options.hh_token,
            batch_size=options.hh_batch_size,
            timeout_s=options.hh_timeout,
            deadline_s=options.hh_deadline,
            max_retries=options.hh_max_retries,
        )
        for i, reward in zip(hh_indices, rewards):
            scores[i] = reward
    return scores


def compute_score(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: Any = None,
    *,
    data_sources: Sequence[str] | None = None,
    solution_strs: Sequence[str] | None = None,
    ground_truths: Sequence[Any] | None = None,
    extra_infos: Sequence[Any] | None = None,
    **options: Any,
) -> float | list[float]:
    """Reward of one sample (naive manager: a float) or of a batch (batch manager: a list, input order).

    MATH, MATH500 and AIME sources: 0/1 on the last ``\\boxed`` answer. ``countdown``: 0/1 on the final
    ``<answer>`` equation. ``arithmetic``: 0/1 on the last integer. ``trl-lib/ultrafeedback_binarized``: the reward server's scalar for
    ``(extra_info["prompt"], solution_str)``.
    """
    settings = _options(options)
    if data_sources is not None:
        if solution_strs is None or ground_truths is None:
            raise TypeError("batch mode needs data_sources=, solution_strs= and ground_truths= together")
        infos = [None] * len(data_sources) if extra_infos is None else extra_infos
        return _score_all(data_sources, solution_strs, ground_truths, infos, settings)
    if data_source is None:
        raise TypeError(
            "pass either data_source, solution_str, ground_truth (naive manager) or "
            "data_sources=, solution_strs=, ground_truths= (batch manager)"
        )
    return _score_all([data_source], [solution_str], [ground_truth], [extra_info], settings)[0]
