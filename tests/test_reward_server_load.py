"""The HH reward server under the loads and faults of a real deployment, on loopback: clients that leave,
retries, a full queue, a slow model load, restarts, a stop past the grace period, and the smaller defects
(port in use, OpenAPI body, empty token, missing tokenizer, what /health shows, 0.0.0.0 without a token,
run_with_server.sh's log and proxies). Slow scorers are fakes that sleep; the encoder and model are real."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from reward_server_fixtures import (TOKEN, SlowScorer, body, fake_loader, health, model_dir, pairs,  # noqa: F401
                                    running, tokenizer)

from verl_tre.reward_server.__main__ import main as server_main, parse_args
from verl_tre.reward_server.app import create_app, load_model
from verl_tre.reward_server.background import free_port
from verl_tre.reward_server.encoding import PairEncoder
from verl_tre.reward_server.settings import ServerSettings
from verl_tre.utils.reward_score.hh import RewardServerError, score_batch

REPO = Path(__file__).resolve().parents[1]
DEAD_PROXY = "http://127.0.0.1:9"
SMALL = dict(max_length=64, batch_tokens=64, chunk_tokens=64)


def test_work_of_a_client_that_left_is_dropped(model_dir, tokenizer):
    scorer = SlowScorer(0.15)
    settings = ServerSettings(model_path=model_dir, port=free_port(), **SMALL)
    with running(settings, loader=fake_loader(tokenizer, scorer)) as server:
        prompts, responses = pairs(40)  # ~35 tokens each: one per pass, 40 passes = 6 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base}/predict", json=body(prompts, responses), timeout=0.5)
        time.sleep(1.0)
        scored = scorer.rows
        start = time.perf_counter()
        r = httpx.post(f"{server.base}/predict", json=body(["p"], ["r"]), timeout=30)
        assert r.status_code == 200
        assert time.perf_counter() - start < 3.0  # not behind the abandoned request's 6 s of work
        time.sleep(0.5)
        assert scorer.rows <= scored + 2 and scored < 20
        assert health(server.base)["served"]["cancelled"] == 1


def test_a_retry_with_the_same_key_is_not_computed_twice(model_dir, tokenizer):
    scorer = SlowScorer(0.1)
    settings = ServerSettings(model_path=model_dir, port=free_port(), **SMALL)
    with running(settings, loader=fake_loader(tokenizer, scorer)) as server:
        url = f"{server.base}/predict"
        prompts, responses = pairs(12)
        key = {"Idempotency-Key": "batch-1"}
        with pytest.raises(httpx.ReadTimeout):  # the first try times out midway: the scored part is kept
            httpx.post(url, json=body(prompts, responses), headers=key, timeout=0.5)
        first_part = scorer.rows
        assert 0 < first_part < 12
        # Two retries at once: they share one computation of the rest.
        answers = [None, None]

        def retry(i):
            answers[i] = httpx.post(url, json=body(prompts, responses), headers=key, timeout=60)

        threads = [threading.Thread(target=retry, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        expected = [float(len(PairEncoder(tokenizer, 64).encode([p], [r])[0].ids)) for p, r in zip(prompts, responses)]
        assert [a.json()["rewards"] for a in answers] == [expected, expected]
        assert scorer.rows == 12  # every pair scored exactly once over three requests
        # The answer was "lost": the same key again gets it without any new work.
        again = httpx.post(url, json=body(prompts, responses), headers=key, timeout=30)
        assert again.json()["rewards"] == expected and scorer.rows == 12
        assert health(server.base)["served"]["deduplicated"] == 3
        conflict = httpx.post(url, json=body(prompts[:1], responses[:1]), headers=key, timeout=30)
        assert conflict.status_code == 409 and "different request body" in conflict.json()["detail"]
        # The project's client sends keys: a whole batch through it scores each pair once more, no more.
        assert score_batch(prompts, responses, url=url, batch_size=12) == expected
        assert scorer.rows == 24


def test_a_full_queue_answers_503_with_retry_after_and_the_client_backs_off(model_dir, tokenizer):
    scorer = SlowScorer(0.2)
    settings = ServerSettings(model_path=model_dir, port=free_port(), max_queue_tokens=100, **SMALL)
    with running(settings, loader=fake_loader(tokenizer, scorer)) as server:
        url = f"{server.base}/predict"
        big = threading.Thread(target=httpx.post, args=(url,), kwargs=dict(json=body(*pairs(8)), timeout=60))
        big.start()  # ~280 tokens, 8 passes
        time.sleep(0.5)
        r = httpx.post(url, json=body(*pairs(2)), timeout=30)
        assert r.status_code == 503 and "overloaded" in r.json()["detail"] and "max_queue_tokens=100" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        start = time.monotonic()
        assert len(score_batch(*pairs(2), url=url, backoff_s=0.01, max_backoff_s=0.01)) == 2
        # It waited as the server asked (Retry-After), not its own 0.01 s backoff: few tries, not hundreds.
        assert time.monotonic() - start >= 0.9
        big.join(timeout=60)
        served = health(server.base)["served"]
        assert served["rejected"] >= 2 and served["rejected"] < 20


def test_the_client_waits_through_a_slow_model_load(model_dir, reference_rewards):
    settings = ServerSettings(model_path=model_dir, port=free_port(), token=TOKEN, **SMALL)
    slow = lambda s: (time.sleep(4.0), load_model(s))[1]  # noqa: E731
    with running(settings, wait_ready=False, loader=slow) as server:
        url = f"{server.base}/predict"
        with pytest.raises(RewardServerError, match="still loading.*hh_deadline"):
            score_batch(["p"], ["r"], url=url, token=TOKEN, deadline_s=1.0)
        start = time.monotonic()
        got = score_batch(*reference_rewards.pairs, url=url, token=TOKEN)  # default deadline: 30 minutes
        assert time.monotonic() - start > 1.0
        assert got == pytest.approx(reference_rewards.values, abs=1e-5)


@pytest.fixture(scope="module")
def reference_rewards(model_dir, tokenizer):
    """Rewards of a few pairs by transformers' own forward (no server)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    prompts, responses = pairs(6, words=4)

    class R:
        pass

    R.pairs = (prompts, responses)
    with torch.inference_mode():
        R.values = [model(input_ids=torch.tensor([PairEncoder(tokenizer, 64).encode([p], [r])[0].ids]))
                    .logits[0, 0].item() for p, r in zip(prompts, responses)]
    return R


@pytest.mark.slow
def test_a_restart_with_a_slow_load_loses_no_reward(model_dir, reference_rewards):
    """Requests go on while the server stops (SIGTERM-like) and a new one loads slowly on the same port."""
    port = free_port()
    settings = ServerSettings(model_path=model_dir, port=port, token=TOKEN, shutdown_grace_s=5, **SMALL)
    prompts, responses = reference_rewards.pairs
    got, errors, progress = [], [], threading.Semaphore(0)

    def client():
        for i in range(12):
            try:
                got.append(score_batch(prompts[i % 6:i % 6 + 1], responses[i % 6:i % 6 + 1],
                                       url=f"http://127.0.0.1:{port}/predict", token=TOKEN, **dict(backoff_s=0.2)))
            except RewardServerError as exc:
                errors.append(exc)
                return
            progress.release()
            time.sleep(0.1)

    thread = threading.Thread(target=client)
    with running(settings, loader=load_model):
        thread.start()
        for _ in range(3):
            assert progress.acquire(timeout=60)
    assert len(got) < 12
    slow = lambda s: (time.sleep(3.0), load_model(s))[1]  # noqa: E731
    with running(settings, wait_ready=False, loader=slow):
        thread.join(timeout=120)
    assert not errors and len(got) == 12
    assert [g[0] for g in got] == pytest.approx([reference_rewards.values[i % 6] for i in range(12)], abs=1e-5)


def test_a_stop_past_the_grace_period_answers_json_503(model_dir, tokenizer, caplog):
    scorer = SlowScorer(3.0)
    settings = ServerSettings(model_path=model_dir, port=free_port(), shutdown_grace_s=1.0, **SMALL)
    answer = {}
    caplog.set_level(logging.INFO)
    with running(settings, loader=fake_loader(tokenizer, scorer)) as server:
        url = f"{server.base}/predict"
        thread = threading.Thread(target=lambda: answer.update(r=httpx.post(url, json=body(*pairs(3)), timeout=30)))
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        server.should_exit = True
        thread.join(timeout=30)
    r = answer["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert "shutting down" in r.json()["detail"] and "Retry-After" in r.headers
    assert time.monotonic() - start < 10
    logged = "\n".join(record.getMessage() + str(record.exc_info or "") for record in caplog.records)
    assert "Traceback" not in logged and "Exception in ASGI" not in logged and "Cancel" not in logged


def test_a_port_in_use_exits_at_once_before_loading(model_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "verl_tre.reward_server", "--model", str(model_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1" in proc.stderr and "--port" in proc.stderr
    assert "reward server ready" not in proc.stderr and "loaded " not in proc.stderr  # no model was loaded
    assert time.monotonic() - start < 60


def test_openapi_documents_the_predict_body(model_dir, tokenizer):
    app = create_app(ServerSettings(model_path=model_dir), loader=fake_loader(tokenizer, SlowScorer(0)))
    operation = app.openapi()["paths"]["/predict"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert operation["requestBody"]["required"] is True
    assert schema["required"] == ["prompts", "responses"]
    assert schema["properties"]["prompts"] == {"items": {"type": "string"}, "title": "Prompts", "type": "array"}
    assert any(p["name"] == "Idempotency-Key" for p in operation["parameters"])
    responses = operation["responses"]
    assert {"200", "401", "409", "413", "415", "422", "500", "503"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"]
    assert responses["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorDetail"}
    assert "rewards" in app.openapi()["components"]["schemas"]["PredictAnswer"]["properties"]


def test_an_empty_token_means_no_auth(model_dir, monkeypatch):
    monkeypatch.delenv("REWARD_SERVER_TOKEN", raising=False)
    assert parse_args(["--model", str(model_dir), "--token", ""]).token is None
    assert ServerSettings(model_path=model_dir, token="").token is None
    monkeypatch.setenv("REWARD_SERVER_TOKEN", "")
    assert parse_args(["--model", str(model_dir)]).token is None
    assert parse_args(["--model", str(model_dir), "--token", "x"]).token.get_secret_value() == "x"


def test_a_model_folder_without_tokenizer_files_is_refused_before_loading(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(ValueError, match="no tokenizer files.*save_pretrained"):
        ServerSettings(model_path=bare)
    proc = subprocess.run([sys.executable, "-m", "verl_tre.reward_server", "--model", str(bare)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "no tokenizer files" in proc.stderr


def test_health_shows_model_path_and_load_error_only_to_the_operator(model_dir):
    def broken(settings):
        raise ValueError("cannot read /very/secret/place/model.safetensors")

    settings = ServerSettings(model_path=model_dir, port=free_port(), token=TOKEN, **SMALL)
    with running(settings, wait_ready=False, loader=broken) as server:
        for _ in range(100):
            anonymous = httpx.get(f"{server.base}/health", timeout=10)
            if anonymous.json()["status"] == "failed":
                break
            time.sleep(0.05)
        assert anonymous.status_code == 503 and anonymous.json()["status"] == "failed"
        assert "/very/secret" not in anonymous.text and str(model_dir) not in anonymous.text
        assert "server's log" in anonymous.json()["error"]
        operator = health(server.base)
        assert "/very/secret/place" in operator["error"] and operator["model"] == str(model_dir)
        r = httpx.post(f"{server.base}/predict", json=body(["p"], ["r"]), timeout=10)
        assert r.status_code == 401 and "/very/secret" not in r.text  # no token: no details by /predict either
        r = httpx.post(f"{server.base}/predict", json=body(["p"], ["r"]), timeout=10,
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 500 and "loading the model failed" in r.json()["detail"]  # not retried for ever


def test_binding_all_interfaces_without_a_token_warns(model_dir, monkeypatch, caplog):
    assert "without a token" in ServerSettings(model_path=model_dir, host="0.0.0.0").exposure_warning()
    assert ServerSettings(model_path=model_dir, host="0.0.0.0", token="t").exposure_warning() is None
    assert ServerSettings(model_path=model_dir, host="127.0.0.1").exposure_warning() is None
    assert ServerSettings(model_path=model_dir, host="localhost").exposure_warning() is None
    # The CLI logs it before binding (the bind is made to fail here, so nothing listens on 0.0.0.0).
    import verl_tre.reward_server.serve as serve

    def refuse(host, port):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(serve, "bind", refuse)
    monkeypatch.delenv("REWARD_SERVER_TOKEN", raising=False)
    caplog.set_level(logging.WARNING)
    assert server_main(["--model", str(model_dir), "--host", "0.0.0.0", "--port", str(free_port())]) == 1
    assert any("binding 0.0.0.0 without a token" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_run_with_server_keeps_the_token_out_of_the_log_and_ignores_proxies(model_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "reward_server_token")}
    env.update(HH_REWARD_MODEL_PATH=str(model_dir), REWARD_SERVER_PORT=str(port), REWARD_SERVER_LOG_DIR=str(tmp_path),
               HEALTH_TIMEOUT="120", PYTHON=sys.executable, http_proxy=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY,
               PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "experiments/hh/reward/run_with_server.sh"), "--token",
                           "very-secret-token", "--no-access-log"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pid = int(next(line for line in proc.stdout.splitlines() if "PID:" in line).split()[1])
    try:
        log = tmp_path / f"reward_server_{port}.log"
        assert "very-secret-token" not in log.read_text() + proc.stdout + proc.stderr
        assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0  # readable by its owner only
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"very-secret-token" not in f.read()  # not in the process list either
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body(["p"], ["r"]), timeout=30, trust_env=False,
                       headers={"Authorization": "Bearer very-secret-token"})
        assert r.status_code == 200  # the token moved from the flags to the environment still works
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(400):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
