"""Shared pieces of the reward server's load and limit tests: the tiny model, a scorer that sleeps, a loader
of it, and a real uvicorn RewardServer on a thread, bound as the CLI binds it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from verl_tre.reward_server.app import Loaded, create_app
from verl_tre.reward_server.encoding import PairEncoder
from verl_tre.reward_server.serve import RewardServer, bind
from verl_tre.reward_server.settings import ServerSettings
from verl_tre.reward_server.tiny import build_tiny_reward_model

TOKEN = "load-test-token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny_rm")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class SlowScorer:
    """Sleeps ``delay_s`` per forward pass; reward = number of tokens; counts every row it scores."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.rows = 0
        self.lock = threading.Lock()

    def score(self, batch):
        time.sleep(self.delay_s)
        with self.lock:
            self.rows += len(batch)
        return [float(len(ids)) for ids in batch]


def fake_loader(tokenizer, scorer, delay_s: float = 0.0, encoder=PairEncoder):
    """A loader of ``scorer`` with the real encoder (or ``encoder(tokenizer, max_length)``)."""
    def load(settings):
        time.sleep(delay_s)
        return Loaded(encoder(tokenizer, settings.max_length), [scorer], ["cpu"], "float32")
    return load


@contextmanager
def running(settings: ServerSettings, wait_ready: bool = True, **app_kwargs):
    """A real uvicorn RewardServer on a thread, on a socket from ``serve.bind`` as in the CLI (not waiting
    for the model unless ``wait_ready``)."""
    app = create_app(settings, **app_kwargs)
    server = RewardServer(app, uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning",
                                              access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s))
    sock = bind("127.0.0.1", settings.port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        while wait_ready and httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
        server.base = base
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def pairs(n: int, words: int = 12):
    return [f"question {i} " + "word " * words for i in range(n)], [f"answer {i}" for i in range(n)]


def body(prompts, responses):
    return {"prompts": prompts, "responses": responses}


def health(base):
    return httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
