"""The HH reward server on a real loopback port with a tiny random Qwen2 reward model.

References are independent of the server's code: transformers' own sequence-classification forward on
``tokenizer.apply_chat_template`` ids, one pair at a time, without padding.
"""

from __future__ import annotations

import gzip
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from verl_tre.reward_server.background import free_port, serve_in_background  # noqa: E402
from verl_tre.reward_server.batching import SIMILAR, Job, LengthAwareBatcher  # noqa: E402
from verl_tre.reward_server.encoding import PairEncoder  # noqa: E402
from verl_tre.reward_server.settings import ServerSettings  # noqa: E402
from verl_tre.reward_server.tiny import build_tiny_reward_model  # noqa: E402
from verl_tre.utils.reward_score.hh import RewardServerError, score_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
# chunk_tokens=64: the longer pairs below (and every truncated one) take the chunked KV-cache path.
LIMITS = dict(max_items=8, max_chars=4000, max_length=96, batch_tokens=256, chunk_tokens=64)

POOL = [
    ("What is 2 + 2?", "4"),
    ("What is 2 + 2?", "It is four, because two and two make four."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("", "An empty prompt still gets a reward."),
    ("An empty response follows.", ""),
    ("Ünïcödé prompt: 日本語のテキスト 🙂", "Réponse en français avec des accents: été, naïve, cœur."),
    ("Line one\nLine two\n\nLine four", "A\nmulti-line\nanswer\n"),
    ("Summarise: " + "the quick brown fox jumps over the lazy dog. " * 4, "A fox jumps over a dog."),
    ("Code?", "```python\ndef f(x):\n    return x * 2\n```"),
    ("Literal special text <|endoftext|> inside", "and a reply that mentions <|im_end|> too"),
    ("Short", "Medium length response with several words in it to vary the padding."),
    ("Why is the sky blue?", "Rayleigh scattering: shorter wavelengths scatter more strongly in the atmosphere."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny_rm")


@pytest.fixture(scope="module")
def reference(model_dir):
    """reward(prompt, response) by transformers' own forward, and the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def reward(prompt: str, response: str) -> float:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], return_tensors="pt")
        return model(input_ids=ids).logits[0, 0].item()

    reward.tokenizer = tokenizer
    reward.model = model
    return reward


@pytest.fixture(scope="module")
def server(model_dir):
    settings = ServerSettings(model_path=model_dir, port=free_port(), token=TOKEN, **LIMITS)
    with serve_in_background(settings) as base_url:
        yield base_url


def post(base_url, json=None, content=None, token=TOKEN, headers=None):
    headers = dict(headers or {})
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{base_url}/predict", json=json, content=content, headers=headers, timeout=60)


def score(base_url, pairs):
    response = post(base_url, json={"prompts": [p for p, _ in pairs], "responses": [r for _, r in pairs]})
    assert response.status_code == 200, response.text
    return response.json()["rewards"]


def test_health_reports_model_devices_and_limits(server, model_dir):
    body = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["ready"] is True and body["error"] is None and body["status"] == "ready"
    assert body["model"] == str(model_dir) and body["authorized"] is True
    assert body["devices"] == ["cpu"] and body["replicas"] == 1
    assert body["auth"] is True
    assert {k: body["limits"][k] for k in LIMITS} == LIMITS
    # Without the token: no absolute path (the folder's name only), and the token is reported as not given.
    anonymous = httpx.get(f"{server}/health").json()
    assert anonymous["model"] == model_dir.name and str(model_dir) not in str(anonymous)
    assert anonymous["authorized"] is False


def test_rewards_match_reference_alone_and_batched(server, reference):
    expected = [reference(p, r) for p, r in POOL]
    alone = [score(server, [pair])[0] for pair in POOL]
    batched = score(server, POOL[:8]) + score(server, POOL[8:])
    assert alone == pytest.approx(expected, abs=1e-5)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 6) for x in expected)) > len(POOL) // 2  # the pairs really score differently


def test_forward_passes_respect_the_token_budget(server, reference):
    long_pairs = [(f"Question {i}: " + "word " * 30, "answer " * 20) for i in range(8)]
    before = httpx.get(f"{server}/health").json()["forward_passes"]
    rewards = score(server, long_pairs)
    passes = httpx.get(f"{server}/health").json()["forward_passes"] - before
    # Each pair is about 75 tokens; a budget of 256 padded tokens fits 3 per pass.
    assert passes >= 3
    assert rewards == pytest.approx([reference(p, r) for p, r in long_pairs], abs=1e-5)


def test_truncation_drops_the_prompt_head_and_reports_it(server, reference):
    tokenizer, model = reference.tokenizer, reference.model
    prompt, response = "Context: " + "lorem ipsum dolor sit amet " * 25 + "Question: why?", "Because it is so."
    body = post(server, json={"prompts": [prompt], "responses": [response]}).json()
    assert body["truncation"]["prompts"] == 1 and body["truncation"]["responses"] == 0
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}])
    assert body["truncation"]["prompt_tokens_dropped"] == len(full) - LIMITS["max_length"]
    # Brute-force reference: cut the same number of tokens right after the template's user header.
    header = len(tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    kept = full[:header] + full[header + len(full) - LIMITS["max_length"]:]
    kept_text = tokenizer.decode(kept)
    assert "Question: why?<|im_end|>" in kept_text and kept_text.endswith(response + "<|im_end|>\n")
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([kept])).logits[0, 0].item()
    assert body["rewards"][0] == pytest.approx(expected, abs=1e-5)

    long_response = "Answer: " + "many words here " * 60 + "final sentence."
    body = post(server, json={"prompts": ["hi"], "responses": [long_response]}).json()
    assert body["truncation"]["responses"] == 1 and body["truncation"]["prompts"] == 1
    assert body["truncation"]["prompt_tokens_dropped"] == len(tokenizer("hi", add_special_tokens=False)["input_ids"])


# ASCII pieces (so a cut between tokens never splits a character), joined without separators so that byte-
# pair merges happen across them. Texts start with a letter: no merge with the template's preceding newline.
_PIECES = ["alpha", "Beta", " gamma", "x", "42", "3.14", "!", "?", ", ", ". ", "\n", "\n\n", "  ", "\t", "(", ")",
           "_", "'s", "don't", "-", "/", ":", "\"q\""]
# A drawn length, not st.lists' own: its small average would rarely exceed max_length.
_texts = st.integers(0, 120).flatmap(
    lambda n: st.lists(st.sampled_from(_PIECES), min_size=n, max_size=n)).map("".join)


@pytest.fixture(scope="module")
def template_parts(reference):
    text = reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": "\x00P"}, {"role": "assistant", "content": "\x00R"}], tokenize=False)
    head, rest = text.split("\x00P")
    mid, tail = rest.split("\x00R")
    return head, mid, tail


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_texts.map(lambda s: "Q" + s), response=_texts.map(lambda s: "A" + s), max_length=st.integers(40, 160))
def test_encoder_never_cuts_the_end_of_a_response(reference, template_parts, prompt, response, max_length):
    tokenizer, (head, mid, tail) = reference.tokenizer, template_parts
    [enc] = PairEncoder(tokenizer, max_length).encode([prompt], [response])
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}])
    if len(full) <= max_length:
        assert enc.ids == full and enc.prompt_tokens_dropped == enc.response_tokens_dropped == 0
        return
    assert len(enc.ids) == max_length
    assert enc.prompt_tokens_dropped + enc.response_tokens_dropped == len(full) - max_length
    text = tokenizer.decode(enc.ids)
    assert text.startswith(head) and text.endswith(tail)
    body = text[len(head):len(text) - len(tail)]
    if enc.response_tokens_dropped == 0:  # only the prompt's head went
        assert body.endswith(mid + response) and prompt.endswith(body[:len(body) - len(mid + response)])
    else:  # the whole prompt went first, then the response's head; its end is intact
        assert body.startswith(mid) and response.endswith(body[len(mid):])
        assert enc.prompt_tokens_dropped == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_encoder_with_multibyte_text_and_a_template_that_rewrites_content(reference):
    """Cuts inside multi-byte characters, and Qwen3's template moving a '</think>' block out of the response
    (content no longer verbatim): the length holds, every cut is counted, and the end is the full text's end."""
    tokenizer = reference.tokenizer
    encoder = PairEncoder(tokenizer, 48)
    cases = [("日本語のテキスト🙂" * 30, "短い答え🙂", False),
             ("hi", "<think>a plan</think>" + " the final answer" * 40, True),
             ("Context " * 40, "draft</think>done", None)]
    for prompt, response, response_cut in cases:
        [enc] = encoder.encode([prompt], [response])
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}])
        assert len(enc.ids) == 48
        assert enc.prompt_tokens_dropped + enc.response_tokens_dropped == len(full) - 48
        assert enc.ids[-6:] == full[-6:]
        if response_cut is not None:
            assert (enc.response_tokens_dropped > 0) == response_cut


def test_encoder_encodes_from_several_threads_at_once(reference):
    """Lanes of the server share one encoder; concurrent encodes (the GIL released in the Rust tokenizer)
    neither fail nor mix their results up."""
    encoder = PairEncoder(reference.tokenizer, 96)
    batches = [([f"prompt {t} {i} " + "word " * (5 + 40 * (i % 3)) for i in range(30)], [f"reply {t}"] * 30)
               for t in range(4)]
    expected = [[e.ids for e in encoder.encode(*batch)] for batch in batches]
    got, errors = [None] * 4, []

    def run(t):
        try:
            for _ in range(5):
                got[t] = [e.ids for e in encoder.encode(*batches[t])]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected


def test_encoder_ignores_truncation_saved_with_the_tokenizer(model_dir, reference, tmp_path):
    """A tokenizer.json saved with truncation on: the encoder still sees every token (and does its own cut),
    and the caller's tokenizer is left as it was."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.enable_truncation(16)
    tokenizer.save_pretrained(tmp_path)
    truncating = AutoTokenizer.from_pretrained(tmp_path)
    assert truncating.backend_tokenizer.truncation["max_length"] == 16
    prompt, response = "a prompt of several words " * 3, "and a response"
    [enc] = PairEncoder(truncating, 64).encode([prompt], [response])
    [plain] = PairEncoder(reference.tokenizer, 64).encode([prompt], [response])
    assert enc == plain and len(enc.ids) > 16
    assert truncating.backend_tokenizer.truncation["max_length"] == 16


BAD_REQUESTS = [
    ("malformed JSON", dict(content=b'{"prompts": ["a"], "responses": '), 422, "Invalid JSON"),
    ("not UTF-8", dict(content=b'{"prompts": ["\xff\xfe"], "responses": ["b"]}'), 422, "invalid unicode"),
    ("lone surrogate", dict(content=b'{"prompts": ["\\ud800"], "responses": ["b"]}'), 422, "invalid unicode"),
    ("lone low surrogate", dict(content=b'{"prompts": ["a\\udc00b"], "responses": ["b"]}'), 422, "invalid unicode"),
    ("gzip body", dict(content=gzip.compress(b'{"prompts": ["a"], "responses": ["b"]}'),
                       headers={"Content-Encoding": "gzip"}), 415, "Content-Encoding 'gzip' is not supported"),
    ("a list, not an object", dict(json=[["a"], ["b"]]), 422, "expected a JSON object"),
    ("missing responses", dict(json={"prompts": ["a"]}), 422, "responses"),
    ("unknown field", dict(json={"prompts": ["a"], "responses": ["b"], "response": ["c"]}), 422, "response"),
    ("length mismatch", dict(json={"prompts": ["a", "b"], "responses": ["c"]}), 422, "one response per prompt"),
    ("empty lists", dict(json={"prompts": [], "responses": []}), 422, "at least one pair"),
    ("integer item", dict(json={"prompts": ["a"], "responses": [3]}), 422, "responses.0"),
    ("null item", dict(json={"prompts": [None], "responses": ["b"]}), 422, "prompts.0"),
    ("nested list item", dict(json={"prompts": [["a"]], "responses": ["b"]}), 422, "prompts.0"),
    ("string instead of list", dict(json={"prompts": "a", "responses": "b"}), 422, "prompts"),
    ("deeply nested JSON", dict(content=b"[" * 100_000 + b"]" * 100_000), 422, "malformed request"),
    ("too many items", dict(json={"prompts": ["a"] * 9, "responses": ["b"] * 9}), 413, "max_items=8"),
    ("too many strings", dict(content=b'{"prompts": [' + b'"",' * 99_999 + b'""], "responses": ["b"]}'), 413,
     "holds 100003 strings, more than 2 x max_items=8"),
    ("too many characters", dict(json={"prompts": ["a" * 3000], "responses": ["b" * 1001]}), 413, "max_chars=4000"),
    ("oversized body", dict(content=b" " * (12 * 4000 + (1 << 20) + 1)), 413, "max_body_bytes"),
    ("oversized chunked body", dict(content=iter([b" " * 700_000] * 2)), 413, "max_body_bytes"),
    ("text/plain body", dict(content=b'{"prompts": ["a"], "responses": ["b"]}', headers={"Content-Type": "text/plain"}),
     415, "application/json"),
    ("form body", dict(content=b"prompts=a&responses=b",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "is not JSON"),
    ("no content type", dict(content=b'{"prompts": ["a"], "responses": ["b"]}', headers={"Content-Type": ""}),
     415, "is not JSON"),
    ("overlong Idempotency-Key", dict(json={"prompts": ["a"], "responses": ["b"]},
                                      headers={"Idempotency-Key": "k" * 201}), 422, "Idempotency-Key"),
    ("wrong token", dict(json={"prompts": ["a"], "responses": ["b"]}, token="nope"), 401, "bearer token"),
    ("missing token", dict(json={"prompts": ["a"], "responses": ["b"]}, token=None), 401, "bearer token"),
]


@pytest.mark.parametrize("kwargs,status,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, reference, kwargs, status, message):
    response = post(server, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert score(server, [POOL[0]]) == pytest.approx([reference(*POOL[0])], abs=1e-5)


def test_sixteen_concurrent_clients_get_their_own_answers_in_order(server, reference):
    expected = {pair: reference(*pair) for pair in POOL}
    failures, done = [], []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            for _ in range(20):
                pairs = [rng.choice(POOL) for _ in range(rng.randint(1, LIMITS["max_items"]))]
                r = http.post(f"{server}/predict", json={"prompts": [p for p, _ in pairs],
                                                          "responses": [s for _, s in pairs]})
                got = r.json()["rewards"] if r.status_code == 200 else r.text
                if got != pytest.approx([expected[p] for p in pairs], abs=1e-5):
                    failures.append((seed, got))
                done.append(1)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(done) == 16 * 20 and not failures, failures[:3]


class _Recorder:
    """A scorer whose answer is a function of the ids it saw; records each pass's row lengths."""

    def __init__(self, seen, delay_s=0.01):
        self.seen, self.delay_s = seen, delay_s

    def score(self, batch):
        self.seen.append([len(ids) for ids in batch])
        time.sleep(self.delay_s)
        return [float(sum(ids)) for ids in batch]


def test_batcher_shares_passes_across_requests_by_length_and_keeps_order():
    """Dynamic batching alone: items of different requests share passes, only with items of similar length."""
    import asyncio

    seen = []

    async def run():
        batcher = LengthAwareBatcher([_Recorder(seen), _Recorder(seen)], batch_tokens=40)
        batcher.start()
        rng = random.Random(0)
        requests = [[[rng.randint(0, 9) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
                    for _ in range(30)]
        jobs = [Job(r) for r in requests]
        for job in jobs:
            batcher.submit(job)
        results = await asyncio.gather(*(job.wait() for job in jobs))
        await batcher.close()
        return requests, results

    requests, results = asyncio.run(run())
    assert results == [[float(sum(ids)) for ids in r] for r in requests]
    assert all(max(b) * len(b) <= 40 for b in seen)
    assert all(max(b) <= SIMILAR ** 2 * min(b) for b in seen)  # a short item is never padded to a long one
    assert sum(map(len, seen)) == sum(map(len, requests))  # each item scored exactly once
    assert len(seen) < sum(len(r) for r in requests) / 2  # items of different requests shared passes


def test_out_of_memory_splits_the_batch():
    from verl_tre.reward_server.batching import score_splitting_on_oom

    class Small:
        def score(self, batch):
            if len(batch) > 2:
                raise torch.OutOfMemoryError("fake OOM")
            return [float(len(ids)) for ids in batch]

    batch = [[1] * n for n in range(1, 10)]
    assert score_splitting_on_oom(Small(), batch) == [float(n) for n in range(1, 10)]


def test_health_is_503_while_loading_then_ready(model_dir):
    """The model loads in the background: /health and /predict say 503 until it is there."""
    from fastapi.testclient import TestClient

    from verl_tre.reward_server.app import create_app, load_model

    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(30)
        return load_model(settings)

    app = create_app(ServerSettings(model_path=model_dir), loader=slow_loader)
    with TestClient(app) as http:
        try:
            assert http.get("/health").status_code == 503
            r = http.post("/predict", json={"prompts": ["a"], "responses": ["b"]})
            assert r.status_code == 503 and "loading" in r.json()["detail"]
        finally:
            gate.set()  # never leave the loader thread blocked: the loop waits for it on exit
        for _ in range(300):
            if http.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        assert http.post("/predict", json={"prompts": ["a"], "responses": ["b"]}).status_code == 200


def test_settings_reject_bad_values_with_the_fix(tmp_path, model_dir):
    with pytest.raises(ValueError, match="no config.json"):
        ServerSettings(model_path=tmp_path)
    with pytest.raises(ValueError, match="raise --batch-tokens"):
        ServerSettings(model_path=model_dir, max_length=4096, batch_tokens=1024)
    with pytest.raises(ValueError, match="cuda:0,cuda:1"):
        ServerSettings(model_path=model_dir, devices="gpu0")


def test_cli_fails_fast_on_a_missing_model(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "verl_tre.reward_server", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    assert time.monotonic() - start < 20


def test_smoke_client_script(server, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", REPO / "experiments/hh/reward/test_reward_server.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setenv("REWARD_SERVER_TOKEN", TOKEN)
    assert smoke.main(["--url", f"{server}/predict"]) == 0
    assert "OK" in capsys.readouterr().out
    monkeypatch.setenv("REWARD_SERVER_TOKEN", "wrong")
    assert smoke.main(["--url", f"{server}/predict"]) == 1


def _launch(model_dir: Path, port: int, log_dir: Path) -> tuple[int, str]:
    env = dict(os.environ, HH_REWARD_MODEL_PATH=str(model_dir), REWARD_SERVER_PORT=str(port),
               REWARD_SERVER_LOG_DIR=str(log_dir), HEALTH_TIMEOUT="120", PYTHON=sys.executable,
               REWARD_SERVER_TOKEN=TOKEN)
    proc = subprocess.run(["bash", str(REPO / "experiments/hh/reward/run_with_server.sh"), "--no-access-log"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pid = int(next(line for line in proc.stdout.splitlines() if "PID:" in line).split()[1])
    return pid, proc.stdout


def _stop(pid: int, timeout_s: float = 40.0) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"server {pid} ignored SIGTERM for {timeout_s} s")


def test_run_with_server_reports_a_failure_with_the_log(tmp_path):
    env = dict(os.environ, HH_REWARD_MODEL_PATH=str(tmp_path / "missing"), REWARD_SERVER_PORT=str(free_port()),
               REWARD_SERVER_LOG_DIR=str(tmp_path), PYTHON=sys.executable, HEALTH_TIMEOUT="60")
    proc = subprocess.run(["bash", str(REPO / "experiments/hh/reward/run_with_server.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode != 0
    assert "no config.json" in proc.stderr and "last lines of" in proc.stderr


@pytest.mark.slow
def test_client_survives_a_restart_without_losing_or_reordering(model_dir, reference, tmp_path):
    """run_with_server.sh starts the server; SIGTERM stops it cleanly mid-run; a second start serves the rest."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    requests = [[(f"Request {i} prompt {j}", f"response {j} to request {i}") for j in range(1 + i % 3)]
                for i in range(30)]
    expected = [[reference(p, r) for p, r in pairs] for pairs in requests]
    got, errors, progress = [], [], threading.Semaphore(0)

    pid, out = _launch(model_dir, port, tmp_path)
    log = tmp_path / f"reward_server_{port}.log"
    assert f"{base}/predict" in out and str(log) in out

    def run_client():  # the project's HH reward client, as verl's reward manager calls it
        for pairs in requests:
            try:
                got.append(score_batch([p for p, _ in pairs], [r for _, r in pairs], url=f"{base}/predict",
                                       token=TOKEN, max_retries=30, backoff_s=0.2, max_backoff_s=1.0))
            except RewardServerError as exc:
                errors.append(exc)
                return
            progress.release()
            time.sleep(0.05)

    thread = threading.Thread(target=run_client)
    thread.start()
    pid2 = None
    try:
        for _ in range(5):
            assert progress.acquire(timeout=60)
        _stop(pid)  # returns once the process is gone; the client is now retrying
        assert len(got) < len(requests)
        assert "reward server stopped after" in log.read_text()  # the lifespan's clean shutdown ran
        pid2, _ = _launch(model_dir, port, tmp_path)
        thread.join(timeout=120)
    finally:
        if pid2 is not None:
            _stop(pid2)
    assert not errors
    assert len(got) == len(requests)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)
    assert "Traceback" not in log.read_text()
