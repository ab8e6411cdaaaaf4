"""The HH reward client against loopback HTTP servers that misbehave on purpose: slow loads, Retry-After,
each kind of 4xx, servers that never answer, proxies in the environment, lone surrogates, the health check."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from verl_tre.reward_server.background import free_port
from verl_tre.utils.reward_score import compute_score
from verl_tre.utils.reward_score.hh import (
    RewardServerError,
    _utf8_safe,
    check_reward_server,
    is_loopback,
    score_batch,
)

REPO = Path(__file__).resolve().parents[1]
FAST = dict(backoff_s=0.05, max_backoff_s=0.2)
# A proxy nobody listens on: a client that used it for loopback would fail.
DEAD_PROXY = "http://127.0.0.1:9"


class Scripted:
    """A loopback server answering /predict from a script of (status, headers, body) answers, then with
    rewards = len(response); /health answers ``health``. Records every request's headers and body."""

    def __init__(self):
        self.port = free_port()
        self.script: list[tuple[int, dict, dict]] = []
        self.seen: list[tuple[dict, dict]] = []
        self.health: tuple[int, dict] = (200, {"ready": True, "status": "ready", "auth": False, "authorized": True})
        app = FastAPI()

        @app.get("/health")
        async def health(request: Request):
            status, body = self.health
            body = dict(body)
            if body.get("auth"):
                body["authorized"] = request.headers.get("authorization") == "Bearer right"
            return JSONResponse(body, status_code=status)

        @app.post("/predict")
        async def predict(request: Request):
            payload = json.loads(await request.body())
            self.seen.append((dict(request.headers), payload))
            if self.script:
                status, headers, body = self.script.pop(0)
                return JSONResponse(body, status_code=status, headers=headers)
            return {"rewards": [float(len(r)) for r in payload["responses"]]}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def __enter__(self):
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("scripted server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def scripted():
    with Scripted() as server:
        yield server


@pytest.fixture(autouse=True)
def _proxies_everywhere(monkeypatch):
    """Every test runs with a dead proxy in the environment and no no_proxy: loopback must bypass it."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY", "REWARD_SERVER_URL", "REWARD_SERVER_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_client_waits_through_loading_and_honours_retry_after(scripted):
    loading = (503, {"Retry-After": "1"}, {"detail": "the model is still loading; retry"})
    scripted.script = [loading, loading]
    start = time.monotonic()
    assert score_batch(["p"], ["abc"], url=scripted.url, **FAST) == [3.0]
    # Two waits of Retry-After = 1 s, though the client's own backoff is 0.05 s.
    assert time.monotonic() - start >= 1.9
    keys = {headers["idempotency-key"] for headers, _ in scripted.seen}
    assert len(scripted.seen) == 3 and len(keys) == 1  # every try of one batch carries the same key


def test_each_batch_gets_its_own_idempotency_key(scripted):
    assert score_batch(["p"] * 3, ["a", "bb", "ccc"], url=scripted.url, batch_size=1, **FAST) == [1.0, 2.0, 3.0]
    assert len({headers["idempotency-key"] for headers, _ in scripted.seen}) == 3


def test_deadline_names_what_it_last_saw(scripted):
    scripted.script = [(503, {"Retry-After": "1"}, {"detail": "the model is still loading; retry"})] * 50
    start = time.monotonic()
    with pytest.raises(RewardServerError) as info:
        score_batch(["p"], ["abc"], url=scripted.url, deadline_s=2.5, **FAST)
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 15
    message = str(info.value)
    assert "deadline_s=2.5" in message and "still loading" in message and "hh_deadline" in message


@pytest.mark.parametrize("status,detail,fix", [
    (401, "missing or wrong bearer token", "REWARD_SERVER_TOKEN"),
    (404, "Not Found", "must be the server's /predict URL"),
    (413, "9 items exceed max_items=8", "hh_batch_size"),
    (415, "Content-Type 'text/plain' is not JSON", "same verl_tre"),
    (422, "malformed request", "same verl_tre"),
])
def test_each_4xx_is_named_with_its_fix_and_not_retried(scripted, status, detail, fix):
    scripted.script = [(status, {}, {"detail": detail})]
    with pytest.raises(RewardServerError) as info:
        score_batch(["p"], ["r"], url=scripted.url, **FAST)
    message = str(info.value)
    assert f"HTTP {status} ({detail})" in message and fix in message
    assert "token" not in message.lower() or status == 401  # only a 401 blames the token
    assert len(scripted.seen) == 1


def test_a_failing_server_is_given_up_after_a_few_tries(scripted):
    scripted.script = [(500, {}, {"detail": "scoring failed: RuntimeError: boom"})] * 10
    with pytest.raises(RewardServerError, match="failed 3 times.*boom"):
        score_batch(["p"], ["r"], url=scripted.url, **FAST)
    assert len(scripted.seen) == 3


def test_a_server_that_never_answers_is_bounded_by_the_deadline():
    """A listener that accepts connections and never answers: each try times out, the deadline ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(RewardServerError) as info:
            score_batch(["p"], ["r"], url=f"http://127.0.0.1:{port}/predict", timeout_s=0.5, deadline_s=2.0, **FAST)
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
    elapsed = time.monotonic() - start
    assert elapsed < 10  # the old client: 6 tries x timeout_s plus 31 s of backoff
    assert "timed out" in str(info.value) and "hh_timeout" in str(info.value)


def test_a_dead_port_is_bounded_by_the_deadline():
    url = f"http://127.0.0.1:{free_port()}/predict"
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="deadline_s=1.5.*run_with_server.sh"):
        score_batch(["p"], ["r"], url=url, deadline_s=1.5, **FAST)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\ud83d\ude00", "x\ud83d", "\udc00\ud800", "plain"])
def test_any_string_is_sent_lone_surrogates_as_u_fffd(scripted, text):
    [reward] = score_batch(["p"], [text], url=scripted.url, **FAST)
    sent = scripted.seen[-1][1]["responses"][0]
    sent.encode("utf-8")  # what went out is valid UTF-8
    assert reward == float(len(sent))
    if text == "\ud83d\ude00":
        assert sent == "\U0001F600"  # a surrogate pair is one character
    elif text != "plain":
        assert "\ufffd" in sent and sent.replace("\ufffd", "") == "".join(c for c in text if not 0xD800 <= ord(c) < 0xE000)
    assert _utf8_safe("plain") == "plain"


def test_a_socks_proxy_without_its_package_is_a_clear_error(monkeypatch):
    """httpx needs socksio for a socks5 ALL_PROXY; without it the client says so (not a raw ImportError)."""
    monkeypatch.setitem(sys.modules, "socksio", None)  # as if it were not installed
    for name in ("all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "socks5://127.0.0.1:9")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RewardServerError,
                       match=r"proxy set in the environment .*socksio.*httpx\[socks\].*NO_PROXY=10\.1\.2\.3"):
        score_batch(["p"], ["r"], url="http://10.1.2.3:8888/predict", **FAST)
    with pytest.raises(RewardServerError, match="socksio"):
        check_reward_server("http://10.1.2.3:8888/predict")


def test_loopback_detection():
    assert all(is_loopback(u) for u in ["http://127.0.0.1:1/p", "http://localhost/p", "http://[::1]:8/p",
                                        "http://127.8.9.1/p"])
    assert not any(is_loopback(u) for u in ["http://10.0.0.1/p", "http://example.com/p", "http://0.0.0.0/p"])


def test_check_reward_server_reports_ready_token_and_down(scripted):
    assert check_reward_server(scripted.url)["ready"] is True  # through the dead proxy's environment
    assert check_reward_server(f"http://127.0.0.1:{scripted.port}")["ready"] is True  # base URL works too
    scripted.health = (200, {"ready": True, "status": "ready", "auth": True})
    with pytest.raises(RewardServerError, match="requires a bearer token"):
        check_reward_server(scripted.url)
    with pytest.raises(RewardServerError, match="rejects the token"):
        check_reward_server(scripted.url, token="wrong")
    assert check_reward_server(scripted.url, token="right")["authorized"] is True
    scripted.health = (503, {"ready": False, "status": "loading"})
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="not ready after .*loading.*run_with_server.sh"):
        check_reward_server(scripted.url, timeout_s=1.0)
    assert 0.9 <= time.monotonic() - start < 10
    scripted.health = (503, {"ready": False, "status": "failed", "error": "ValueError: bad model"})
    with pytest.raises(RewardServerError, match="failed to load its model: ValueError: bad model"):
        check_reward_server(scripted.url, timeout_s=30)
    with pytest.raises(RewardServerError, match="Connection refused|ConnectError"):
        check_reward_server(f"http://127.0.0.1:{free_port()}/predict")


def test_check_cli_exit_codes(scripted):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "http_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY}
    ok = subprocess.run([sys.executable, "-m", "verl_tre.reward_server.check", scripted.url], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ready" in ok.stdout and "Warning" not in ok.stderr, ok.stderr
    down = subprocess.run([sys.executable, "-m", "verl_tre.reward_server.check",
                           f"http://127.0.0.1:{free_port()}/predict"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 1 and "run_with_server.sh" in down.stderr


def test_trainer_reward_options_reach_the_client():
    """hh_deadline, hh_timeout and hh_max_retries from reward_kwargs bound the wait of compute_score."""
    url = f"http://127.0.0.1:{free_port()}/predict"
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="deadline_s=1"):
        compute_score(data_sources=["trl-lib/ultrafeedback_binarized"], solution_strs=["r"], ground_truths=[None],
                      extra_infos=[{"prompt": "p"}], hh_url=url, hh_deadline=1.0)
    assert time.monotonic() - start < 10
    with pytest.raises(RewardServerError, match="max_retries=1"):
        compute_score(data_sources=["trl-lib/ultrafeedback_binarized"], solution_strs=["r"], ground_truths=[None],
                      extra_infos=[{"prompt": "p"}], hh_url=url, hh_max_retries=1)
    with pytest.raises(ValueError, match="hh_deadline"):
        compute_score(data_sources=["trl-lib/ultrafeedback_binarized"], solution_strs=["r"], ground_truths=[None],
                      extra_infos=[{"prompt": "p"}], hh_url=url, hh_deadline=0)
