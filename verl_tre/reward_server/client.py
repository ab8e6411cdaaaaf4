"""A small synchronous client for the reward server: chunking, timeouts and bounded retries.

Retries (with exponential backoff) cover what a restart or overload looks like from outside: connection
errors, dropped connections and 5xx answers. A 4xx answer is the caller's mistake and is raised at once with
the server's message. /predict is idempotent, so a retried chunk is simply scored again.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8888/predict"


class RewardServerError(RuntimeError):
    """The server refused a request (4xx) or stayed unreachable or failing through every retry."""


def health_url(predict_url: str) -> str:
    """``http://host:port/predict`` -> ``http://host:port/health``."""
    parts = urlsplit(predict_url)
    path = parts.path.rsplit("/", 1)[0] + "/health"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class RewardClient:
    """Score (prompt, response) pairs on a reward server at ``url`` (the /predict URL).

    ``max_items`` splits long lists into requests of at most that many pairs; ``retries`` extra attempts
    per request wait ``backoff_s * 2**k`` seconds (capped at ``max_backoff_s``) between them.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 300.0,
                 retries: int = 8, backoff_s: float = 0.5, max_backoff_s: float = 10.0, max_items: int = 256):
        if max_items < 1 or retries < 0:
            raise ValueError("max_items must be >= 1 and retries >= 0")
        self.url = url
        self.retries, self.backoff_s, self.max_backoff_s, self.max_items = retries, backoff_s, max_backoff_s, max_items
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code < 500:
                return response
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        raise RewardServerError(
            f"reward server at {url} failed {self.retries + 1} attempt(s), last: {last}. Is it running? Start it "
            "with experiments/hh/reward/run_with_server.sh and point REWARD_SERVER_URL at its /predict URL"
        )

    def health(self) -> dict:
        """The server's /health JSON once it answers 200 (ready); retries while it is down or loading."""
        response = self._request("GET", health_url(self.url))
        if response.status_code != 200:
            raise RewardServerError(f"{health_url(self.url)} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def predict(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One reward per pair, in order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.max_items):
            chunk = {"prompts": prompts[start:start + self.max_items],
                     "responses": responses[start:start + self.max_items]}
            response = self._request("POST", self.url, json=chunk)
            if response.status_code != 200:
                try:
                    detail = response.json().get("detail", response.text)
                except ValueError:
                    detail = response.text
                raise RewardServerError(f"reward server at {self.url} refused the request "
                                        f"({response.status_code}): {detail}")
            scores = response.json()["rewards"]
            if len(scores) != len(chunk["prompts"]):
                raise RewardServerError(f"reward server at {self.url} returned {len(scores)} rewards for "
                                        f"{len(chunk['prompts'])} pairs")
            rewards.extend(scores)
        return rewards
