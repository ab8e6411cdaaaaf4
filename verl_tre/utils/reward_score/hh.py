"""HH reward: a batched HTTP client of the reward-model server.

Protocol: ``POST {url}`` with ``{"prompts": [str], "responses": [str]}`` answers ``{"rewards": [float]}`` in
input order; an optional bearer token goes in ``Authorization``. The URL defaults to ``$REWARD_SERVER_URL``
(else ``http://127.0.0.1:8888/predict``), the token to ``$REWARD_SERVER_TOKEN``. Connection errors,
timeouts and 5xx answers are retried a bounded number of times with exponential backoff; 4xx answers are
not retried and their message is raised; a server that stays down raises an error naming the URL.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8888/predict"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


def _post_with_retries(
    client: httpx.Client, url: str, payload: dict, max_retries: int, backoff_s: float, max_backoff_s: float
) -> httpx.Response:
    last_problem = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
        try:
            response = client.post(url, json=payload)
        except httpx.TransportError as error:
            last_problem = f"{type(error).__name__}: {error}"
            continue
        if response.status_code >= 500:
            last_problem = f"HTTP {response.status_code}: {response.text[:500]}"
            continue
        if response.status_code >= 400:
            raise RewardServerError(
                f"reward server at {url} rejected the request with HTTP {response.status_code}: "
                f"{response.text[:1000]} (check REWARD_SERVER_TOKEN and the request format)"
            )
        return response
    raise RewardServerError(
        f"reward server at {url} did not answer after {max_retries + 1} tries (last: {last_problem}); "
        "start it (experiments/hh/reward) and wait for GET /health, or point REWARD_SERVER_URL at a running one"
    )


def _rewards_from(response: httpx.Response, url: str, expected: int) -> list[float]:
    try:
        rewards = response.json()["rewards"]
    except (ValueError, KeyError, TypeError) as error:
        raise RewardServerError(
            f'reward server at {url} answered without a "rewards" list: {response.text[:500]}'
        ) from error
    if not isinstance(rewards, list) or len(rewards) != expected:
        raise RewardServerError(f"reward server at {url} returned {rewards!r:.200} for a batch of {expected}")
    values = []
    for reward in rewards:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise RewardServerError(f"reward server at {url} returned a non-finite or non-numeric reward {reward!r}")
        values.append(float(reward))
    return values


def score_batch(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    url: str | None = None,
    token: str | None = None,
    batch_size: int = 32,
    timeout_s: float = 120.0,
    max_retries: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
) -> list[float]:
    """Rewards (one float per pair, input order) for ``len(prompts)`` prompt/response pairs.

    Sends ``batch_size`` pairs per request; each request may take ``timeout_s`` seconds and is tried
    ``max_retries + 1`` times, waiting ``backoff_s * 2**k`` (at most ``max_backoff_s``) seconds in between.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    if batch_size < 1 or max_retries < 0 or timeout_s <= 0:
        raise ValueError(
            f"need batch_size >= 1, max_retries >= 0 and timeout_s > 0, got {batch_size}, {max_retries}, {timeout_s}"
        )
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(f"pair {i}: prompts and responses must be strings, got {type(prompt).__name__}, "
                            f"{type(response).__name__}")
    url = url or os.environ.get("REWARD_SERVER_URL") or DEFAULT_URL
    token = token if token is not None else os.environ.get("REWARD_SERVER_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # A proxy from the environment must never sit between us and a server on this machine.
    trust_env = urlsplit(url).hostname not in _LOOPBACK_HOSTS
    rewards: list[float] = []
    with httpx.Client(timeout=timeout_s, headers=headers, trust_env=trust_env) as client:
        for start in range(0, len(prompts), batch_size):
            payload = {
                "prompts": list(prompts[start : start + batch_size]),
                "responses": list(responses[start : start + batch_size]),
            }
            response = _post_with_retries(client, url, payload, max_retries, backoff_s, max_backoff_s)
            rewards.extend(_rewards_from(response, url, len(payload["prompts"])))
    return rewards
