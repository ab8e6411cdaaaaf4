"""HH reward: a patient, batched HTTP client of the reward-model server (verl_tre.reward_server).

Protocol: ``POST {url}`` with ``{"prompts": [str], "responses": [str]}`` answers ``{"rewards": [float]}`` in
input order; an optional bearer token goes in ``Authorization``. The URL defaults to ``$REWARD_SERVER_URL``
(else ``http://127.0.0.1:8888/predict``), the token to ``$REWARD_SERVER_TOKEN``.

Waiting: a batch is retried while the server cannot answer yet (connection refused, 503 while the model loads
or the server restarts, 429/503 when it is overloaded, 502/504 from a proxy, a request timeout), honouring
``Retry-After``, until ``deadline_s`` (default 30 minutes: a 7B model takes minutes to load) has passed since
its first try. Each try may take ``timeout_s``; no try outlives the deadline, so ``deadline_s`` bounds the wait
per batch. Every try of a batch carries the same ``Idempotency-Key``, so a server that is still working on it
(or has just answered it) does not compute it again. A 4xx is not retried: the error says which one and what
fixes it. Strings with lone surrogates (not encodable as UTF-8) are sent with U+FFFD in their place.

From the shell: ``python -m verl_tre.reward_server.check [URL] [--timeout S]`` exits 0 once the server is
ready (see :func:`check_reward_server`).
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8888/predict"
DEFAULT_DEADLINE_S = 1800.0
URL_ENV = "REWARD_SERVER_URL"
TOKEN_ENV = "REWARD_SERVER_TOKEN"
START_HINT = ("start it with `HH_REWARD_MODEL_PATH=DIR bash experiments/hh/reward/run_with_server.sh` and wait "
              f"until it says ready, or point {URL_ENV} at a running server")
# A scoring failure (500) is the server's own: worth a few tries, not the whole deadline.
_MAX_SERVER_ERRORS = 3
_TRANSIENT = frozenset({429, 502, 503, 504})


class RewardServerError(RuntimeError):
    """The reward server could not be reached in time, refused the request, or answered something unusable."""


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (then no proxy from the environment may sit in between)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_client(url: str, timeout_s: float, token: str | None = None) -> httpx.Client:
    """An httpx client for ``url``: bearer token if given, environment proxies ignored for loopback URLs.
    Raises :class:`RewardServerError` if a proxy from the environment cannot be used (a SOCKS proxy needs
    the socksio package)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.Client(timeout=timeout_s, headers=headers, trust_env=not is_loopback(url))
    except (ImportError, ValueError) as exc:  # httpx builds the proxies of ALL_PROXY / HTTP(S)_PROXY here
        host = urlsplit(url).hostname or url
        raise RewardServerError(
            f"cannot reach the reward server at {url} through the proxy set in the environment ({exc}); for a "
            f"SOCKS proxy install its support (pip install 'httpx[socks]'), or bypass the proxy for the server "
            f"with NO_PROXY={host}") from None


def _base_url(url: str) -> str:
    """``http://host:port/prefix`` for ``http://host:port/prefix/predict`` (or for the base itself)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith("/predict"):
        path = path[: -len("/predict")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _utf8_safe(text: str) -> str:
    """``text`` unchanged if UTF-8 can encode it; else surrogate pairs joined and lone surrogates -> U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` message, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or "(empty body)"
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:600]
    return response.text[:300]


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if there is a usable one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _refusal(url: str, response: httpx.Response) -> RewardServerError:
    """The error for a 4xx answer: which one, the server's words, and what fixes it."""
    code = response.status_code
    if code in (401, 403):
        fix = (f"the bearer token does not match the server's: set {TOKEN_ENV} (or the reward option hh_token) to "
               "the token the server was started with")
    elif code in (404, 405):
        fix = (f"nothing at this URL takes POST: {URL_ENV} must be the server's /predict URL, e.g. {DEFAULT_URL}")
    elif code == 413:
        fix = ("the batch is over the server's limits (GET /health shows them): lower the reward option "
               "hh_batch_size, or raise the server's --max-items / --max-chars")
    elif code in (415, 422):
        fix = "the server could not read the request: check that client and server come from the same verl_tre"
    elif code == 409:
        fix = "an Idempotency-Key was reused for a different request: retry, a new key is drawn per batch"
    else:
        fix = "see the server's log"
    return RewardServerError(f"reward server at {url} refused the request: HTTP {code} ({_detail(response)}); {fix}")


def _gave_up(url: str, tries: int, waited: float, last: str, why: str) -> RewardServerError:
    if "loading" in last:
        fix = ("the model was still loading: wait for GET /health to say ready before training, or raise the "
               "reward option hh_deadline")
    elif "timed out" in last:
        fix = ("the server took connections but did not answer in time (overloaded or hung): check its log, "
               "raise the reward option hh_timeout or lower hh_batch_size")
    elif "overloaded" in last or "HTTP 429" in last:
        fix = "the server stayed overloaded: give it more replicas (--devices) or fewer clients"
    else:
        fix = START_HINT
    return RewardServerError(
        f"reward server at {url} did not answer after {tries} tries in {waited:.0f} s ({why}); last: {last}; {fix}")


def _post_until_answered(client: httpx.Client, url: str, body: bytes, timeout_s: float, deadline_s: float,
                         max_retries: int | None, backoff_s: float, max_backoff_s: float) -> httpx.Response:
    """POST ``body`` until a 2xx arrives (returned), a 4xx arrives (raised), or time or tries run out."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
    start = time.monotonic()
    tries, server_errors, last = 0, 0, "no answer yet"
    while True:
        remaining = start + deadline_s - time.monotonic()
        wait = None
        if remaining <= 0:
            raise _gave_up(url, tries, time.monotonic() - start, last, f"deadline_s={deadline_s:g}")
        per_try = min(timeout_s, remaining)
        tries += 1
        try:
            response = client.post(url, content=body, headers=headers,
                                   timeout=httpx.Timeout(per_try, connect=min(per_try, 30.0)))
        except httpx.TimeoutException:
            last = f"timed out after {per_try:.0f} s without an answer (timeout_s={timeout_s:g})"
        except httpx.TransportError as error:
            last = f"{type(error).__name__}: {error}"
        else:
            if response.status_code < 400:
                return response
            if response.status_code < 500 and response.status_code not in _TRANSIENT:
                raise _refusal(url, response)
            last = f"HTTP {response.status_code}: {_detail(response)}"
            wait = _retry_after(response)
            if response.status_code not in _TRANSIENT:
                server_errors += 1
                if server_errors >= _MAX_SERVER_ERRORS:
                    raise RewardServerError(f"reward server at {url} failed {server_errors} times: {last}; "
                                            "see the server's log")
        if max_retries is not None and tries > max_retries:
            raise _gave_up(url, tries, time.monotonic() - start, last, f"max_retries={max_retries}")
        if wait is None:
            wait = min(backoff_s * 2 ** min(tries - 1, 30), max_backoff_s)
        wait *= random.uniform(1.0, 1.25)  # many clients turned away together should not return together
        time.sleep(max(0.0, min(wait, start + deadline_s - time.monotonic())))


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
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_retries: int | None = None,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
) -> list[float]:
    """Rewards (one float per pair, input order) for ``len(prompts)`` prompt/response pairs.

    Sends ``batch_size`` pairs per request. Each try of a request may take ``timeout_s`` seconds; a request
    is retried (see the module's docstring) until it has taken ``deadline_s`` seconds in all, or after
    ``max_retries`` retries if that is set, waiting ``Retry-After`` or else ``backoff_s * 2**k`` seconds (at
    most ``max_backoff_s``) between tries. Raises :class:`RewardServerError` naming what it last saw.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    if batch_size < 1 or timeout_s <= 0 or deadline_s <= 0 or (max_retries is not None and max_retries < 0):
        raise ValueError(f"need batch_size >= 1, timeout_s > 0, deadline_s > 0 and max_retries >= 0 (or None), got "
                         f"{batch_size}, {timeout_s}, {deadline_s}, {max_retries}")
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(f"pair {i}: prompts and responses must be strings, got {type(prompt).__name__}, "
                            f"{type(response).__name__}")
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    rewards: list[float] = []
    with http_client(url, timeout_s, token) as client:
        for start in range(0, len(prompts), batch_size):
            payload = {"prompts": [_utf8_safe(p) for p in prompts[start : start + batch_size]],
                       "responses": [_utf8_safe(r) for r in responses[start : start + batch_size]]}
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            response = _post_until_answered(client, url, body, timeout_s, deadline_s, max_retries, backoff_s,
                                            max_backoff_s)
            rewards.extend(_rewards_from(response, url, len(payload["prompts"])))
    return rewards


def check_reward_server(url: str | None = None, token: str | None = None, timeout_s: float = 0.0,
                        alive: Callable[[], bool] | None = None) -> dict:
    """Check that the reward server for ``url`` (its /predict URL or base URL; default ``$REWARD_SERVER_URL``)
    is ready and, when it requires one, accepts ``token`` (default ``$REWARD_SERVER_TOKEN``).

    Polls ``GET /health`` (no proxy for loopback) until it says ready or ``timeout_s`` seconds have passed (0:
    one look), while ``alive()`` (e.g. "the server process still runs") holds. Returns the health answer;
    raises :class:`RewardServerError` naming what it last saw and how to start the server.
    """
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    health_url = _base_url(url) + "/health"
    start, last = time.monotonic(), "no answer"
    with http_client(url, 10.0, token) as client:
        while True:
            if alive is not None and not alive():
                raise RewardServerError(f"the reward server for {url} stopped before it was ready (last: {last})")
            try:
                response = client.get(health_url)
                try:
                    body = response.json()
                except ValueError:
                    body = {}
                if not isinstance(body, dict):
                    body = {}
                if response.status_code == 200:
                    if body.get("auth") and not token:
                        raise RewardServerError(
                            f"the reward server at {url} requires a bearer token: set {TOKEN_ENV} (or the reward "
                            "option hh_token) to the token it was started with")
                    if body.get("auth") and body.get("authorized") is False:
                        raise RewardServerError(
                            f"the reward server at {url} rejects the token given: set {TOKEN_ENV} (or the reward "
                            "option hh_token) to the token it was started with")
                    return body
                if body.get("status") == "failed":
                    raise RewardServerError(f"the reward server at {url} failed to load its model: "
                                            f"{body.get('error')}; fix it and start the server again")
                last = f"HTTP {response.status_code}: {body.get('status') or _detail(response)}"
                if response.status_code == 404:
                    last += f" (no /health at {health_url}: is this the reward server?)"
            except httpx.TransportError as error:
                last = f"{type(error).__name__}: {error}"
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise RewardServerError(
                    f"the reward server at {url} is not ready after {waited:.0f} s (last: {last}); {START_HINT}")
            time.sleep(min(0.5, max(0.0, timeout_s - waited)))
