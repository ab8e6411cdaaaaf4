"""The FastAPI app: POST /predict scores (prompt, response) pairs, GET /health says whether it can.

Protocol: ``POST /predict {"prompts": [str], "responses": [str]}`` (``Content-Type: application/json``) ->
``200 {"rewards": [float], "truncation": {...}}`` in input order. An ``Idempotency-Key`` header makes retries
safe: a request with the key of one still being read or scored waits for that work and gets its answer (the
pairs are scored once), and one already answered gets the same answer again while it is kept
(``IDEMPOTENCY_TTL_S``, within ``idempotency_cache_bytes``; see idempotency.py).

Errors, each with a JSON ``detail`` that names the problem and the fix: 401 wrong or missing bearer token
(when one is set), 409 an Idempotency-Key reused for a different body, 413 over a limit (``max_body_bytes``,
``max_items``, ``max_chars``: size and item count are checked before the body is decoded), 415 not JSON or
compressed, 422 malformed (invalid unicode named as such), 503 with ``Retry-After`` while the model loads,
when the queue is full (over ``max_queue_tokens``; twice that for the retry of a request refused before) or
while the server stops, 500 if loading or scoring failed. The model loads in the background so /health
answers at once. A request whose client disconnects is dropped from the queue. Decoding and tokenizing run
in worker threads, in turns (tokenizing.py), so a big request does not stall the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .batching import Job, LengthAwareBatcher, ShuttingDown
from .encoding import PairEncoder
from .idempotency import Entry, IdempotencyCache
from .payload import (ErrorDetail, PredictAnswer, PredictRequest, check_headers, check_items_before_decoding,
                      parse_request, read_body)
from .settings import ServerSettings
from .tokenizing import FairTokenizer

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S = 600.0
REFUSED_KEYS_KEPT = 4096  # keys of requests refused as overloaded, remembered to let their retries in


def _error(description: str, **extra) -> dict:
    return {"model": ErrorDetail, "description": description, **extra}


PREDICT_RESPONSES = {
    200: {"model": PredictAnswer, "description": "One reward per pair, in input order."},
    401: _error("Missing or wrong bearer token (only when the server has one)."),
    409: _error("The Idempotency-Key was used before for a different body."),
    413: _error("Over max_body_bytes, max_items or max_chars (the detail names the limit)."),
    415: _error("Not JSON, or compressed (Content-Encoding is not supported)."),
    422: _error("Malformed: not the protocol, invalid JSON, invalid unicode, or a bad Idempotency-Key."),
    500: _error("Loading the model or scoring failed."),
    503: _error("The model is loading, the queue is full, or the server is stopping: retry.",
                headers={"Retry-After": {"description": "seconds to wait before retrying",
                                         "schema": {"type": "integer"}}}),
}


@dataclass
class Loaded:
    """What a loader returns: the encoder, one scorer per device, the devices' names and the weights' dtype."""

    encoder: PairEncoder
    scorers: list
    devices: list[str]
    dtype: str


def load_model(settings: ServerSettings) -> Loaded:
    """Load the tokenizer and one replica per device (minutes for a 7B model)."""
    from transformers import AutoTokenizer

    from .replicas import Replica, resolve_devices, resolve_dtype

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    except (OSError, TypeError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {settings.model_path} ({type(exc).__name__}: {exc}); save "
                         "the tokenizer the reward model was trained with next to it") from exc
    encoder = PairEncoder(tokenizer, settings.max_length)
    devices = resolve_devices(settings.devices)
    scorers = [
        Replica.load(settings.model_path, d, resolve_dtype(settings.dtype, d), settings.attn_implementation)
        for d in devices
    ]
    dtype = str(resolve_dtype(settings.dtype, devices[0])).removeprefix("torch.")
    return Loaded(encoder, scorers, [str(d) for d in devices], dtype)


@dataclass
class _State:
    settings: ServerSettings
    loaded: Loaded | None = None
    batcher: LengthAwareBatcher | None = None
    tokenizer: FairTokenizer | None = None
    error: str | None = None
    stopping: bool = False
    jobs: IdempotencyCache = field(init=False)
    refused: OrderedDict = field(default_factory=OrderedDict)  # Idempotency-Keys refused as overloaded
    served: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "items": 0, "truncated_items": 0, "deduplicated": 0, "cancelled": 0, "rejected": 0})

    def __post_init__(self):
        self.jobs = IdempotencyCache(self.settings.idempotency_cache_bytes, IDEMPOTENCY_TTL_S)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.stopping

    @property
    def status(self) -> str:
        if self.stopping:
            return "stopping"
        if self.error:
            return "failed"
        return "ready" if self.batcher is not None else "loading"

    def begin_stopping(self, grace_s: float) -> None:
        """Called when the server starts to stop: refuse new work, and fail what is still queued with a 503
        before the grace period ends (after it, uvicorn cancels the requests outright)."""
        self.stopping = True
        if self.batcher is not None:
            error = ShuttingDown("the reward server is shutting down; retry in a few seconds")
            asyncio.get_running_loop().call_later(max(0.05, min(0.8 * grace_s, grace_s - 0.5)),
                                                  self.batcher.fail_all, error)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _busy(detail: str, retry_after_s: float) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": str(max(1, min(30, math.ceil(retry_after_s))))})


def _json(answer: bytes) -> Response:
    return Response(answer, media_type="application/json")


def create_app(
    settings: ServerSettings,
    loader: Callable[[ServerSettings], Loaded] = load_model,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. ``loader`` runs in a thread at startup; if it raises, /health reports the failure with
    503 and ``on_load_failure`` (the CLI passes one that stops the server) is called. Serve it with
    :class:`verl_tre.reward_server.serve.RewardServer` so that a stop past the grace period answers 503."""
    state = _State(settings)

    async def load() -> None:
        try:
            loaded = await asyncio.to_thread(loader, settings)
            tokenizer = FairTokenizer(loaded.encoder, settings.piece_chars)
        except Exception as exc:
            log.exception("loading the reward model failed")
            state.error = f"{type(exc).__name__}: {exc}"
            if on_load_failure is not None:
                on_load_failure()
            return
        state.loaded, state.tokenizer = loaded, tokenizer
        batcher = LengthAwareBatcher(loaded.scorers, settings.batch_tokens, settings.chunk_tokens)
        batcher.start()
        state.batcher = batcher
        log.info("reward server ready on %s (%d replica(s))", ", ".join(loaded.devices), len(loaded.scorers))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            if state.batcher is not None:
                await state.batcher.close()
            log.info("reward server stopped after %d request(s)", state.served["requests"])

    app = FastAPI(title="HH reward server", lifespan=lifespan)
    app.state.reward = state
    bearer = HTTPBearer(auto_error=False)

    def token_ok(credentials: HTTPAuthorizationCredentials | None) -> bool:
        if settings.token is None:
            return True
        expected = settings.token.get_secret_value().encode()
        return credentials is not None and secrets.compare_digest(credentials.credentials.encode(), expected)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not token_ok(credentials):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the server's "
                "--token (REWARD_SERVER_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JSONResponse:
        authorized = token_ok(credentials)
        # The model's location and load errors are for the operator: the token holder, or (no token) this machine.
        details = authorized if settings.token is not None else _is_loopback(request.client and request.client.host)
        error = state.error if details or state.error is None else "loading the model failed; see the server's log"
        body = {
            "ready": state.ready,
            "status": state.status,
            "model": str(settings.model_path) if details else settings.model_path.name,
            "devices": state.loaded.devices if state.loaded else [],
            "replicas": len(state.loaded.scorers) if state.loaded else 0,
            "dtype": state.loaded.dtype if state.loaded else settings.dtype,
            "limits": settings.limits(),
            "auth": settings.token is not None,
            "authorized": authorized,
            "served": dict(state.served),
            "forward_passes": state.batcher.forward_passes if state.batcher else 0,
            "queued_tokens": state.batcher.queued_tokens if state.batcher else 0,
            "idempotency_cache": {"entries": len(state.jobs), "bytes": state.jobs.bytes},
            "error": error,
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    openapi_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()}}}, "parameters": [
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 200},
         "description": "the same key on every try of one request: a retry is never scored twice"}]}

    @app.post("/predict", dependencies=[Depends(authorize)], openapi_extra=openapi_body,
              responses=PREDICT_RESPONSES)
    async def predict(request: Request) -> Response:
        if state.stopping:
            raise _busy("the reward server is shutting down; retry in a few seconds", 2)
        if state.error:
            raise HTTPException(500, f"loading the model failed: {state.error}; fix it and restart the server")
        if not state.ready:
            raise _busy("the model is still loading; retry (GET /health says when it is ready)", 5)
        check_headers(request)
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= 200:
            raise HTTPException(422, "Idempotency-Key must have 1 to 200 characters")
        body = await read_body(request, settings.max_body_bytes)
        fingerprint = await _decoding(body, _inspect, body, key is not None)
        if not key:
            return await _answer(request, await _admit(body, None), None, None)
        entry = state.jobs.get(key)
        if entry is None:
            entry = state.jobs.begin(key, fingerprint)
            job = await _admit_keyed(body, key, entry, None)
        elif entry.fingerprint != fingerprint:
            raise HTTPException(409, "this Idempotency-Key was used for a different request body; use a new "
                                     "key for each request (the same one only for its retries)")
        else:
            state.served["deduplicated"] += 1
            if entry.answer is not None:
                return _json(entry.answer)
            job = await entry.wait_admitted()  # a duplicate of one still being admitted waits for it
            if entry.answer is not None:
                return _json(entry.answer)
            if job.cancelled:  # every client left it; what was scored is kept, the rest needs the ids again
                state.jobs.readmit(entry)
                job = await _admit_keyed(body, key, entry, job)
        return await _answer(request, job, key, entry)

    def _inspect(body: bytes, keyed: bool) -> bytes | None:
        """Refuse too many items before decoding; the body's hash for an Idempotency-Key."""
        check_items_before_decoding(body, settings)
        return hashlib.sha256(body).digest() if keyed else None

    async def _decoding(body: bytes, fn, *args):
        """``fn(*args)`` on ``body``: inline for a body up to a piece's size (quick), else in a worker thread
        in the tokenizer's bulk lane (off the event loop, and one big body at a time)."""
        if len(body) <= settings.piece_chars:
            return fn(*args)
        return await state.tokenizer.in_bulk_lane(fn, *args)

    async def _admit_keyed(body: bytes, key: str, entry: Entry, resume: Job | None) -> Job:
        try:
            job = await _admit(body, key, resume)
        except Exception as exc:
            state.jobs.refused(key, entry, exc)
            raise
        except BaseException:
            state.jobs.refused(key, entry, _busy("the request it duplicates was interrupted; retry", 1))
            raise
        state.jobs.admitted(key, entry, job)
        return job

    async def _admit(body: bytes, key: str | None, resume: Job | None = None) -> Job:
        """Decode, check and tokenize the body, and queue its job (``resume``: an abandoned job of this body)."""
        batcher = state.batcher
        # A request refused before (same key) may fill the queue to twice the bound: it is not refused again
        # and again while newer requests slip in. Retry-After is half the queue's estimated drain time:
        # refused clients return before it runs empty.
        limit = settings.max_queue_tokens * (2 if key is not None and key in state.refused else 1)

        def refuse(detail: str, retry_after_s: float) -> HTTPException:
            state.served["rejected"] += 1
            if key is not None:
                state.refused[key] = None
                while len(state.refused) > REFUSED_KEYS_KEPT:
                    state.refused.popitem(last=False)
            return _busy(detail, retry_after_s)

        if batcher.queued_tokens >= limit:
            raise refuse(f"the reward server is overloaded ({batcher.queued_tokens} tokens queued, max_queue_tokens="
                         f"{settings.max_queue_tokens}); retry later", batcher.drain_estimate_s() / 2)
        payload = await _decoding(body, parse_request, body, settings)
        encoded = await state.tokenizer.encode(payload.prompts, payload.responses)
        tokens = sum(len(e.ids) for e in encoded)
        # An empty queue takes any request (within the limits above), so that none is refused forever.
        if batcher.queued_tokens and batcher.queued_tokens + tokens > limit:
            raise refuse(f"the reward server is overloaded ({batcher.queued_tokens} tokens queued, this request "
                         f"{tokens}, max_queue_tokens={settings.max_queue_tokens}); retry later",
                         batcher.drain_estimate_s(tokens) / 2)
        if resume is not None:
            job = resume
            job.ids = [e.ids for e in encoded]
        else:
            job = Job([e.ids for e in encoded])
            job.truncation = {
                "prompts": sum(e.prompt_tokens_dropped > 0 for e in encoded),
                "responses": sum(e.response_tokens_dropped > 0 for e in encoded),
                "prompt_tokens_dropped": sum(e.prompt_tokens_dropped for e in encoded),
                "response_tokens_dropped": sum(e.response_tokens_dropped for e in encoded),
            }
            job.cut = sum(e.prompt_tokens_dropped + e.response_tokens_dropped > 0 for e in encoded)
            if job.truncation["responses"]:
                log.warning("cut the head of %d response(s) to max_length=%d (prompts fully dropped first)",
                            job.truncation["responses"], settings.max_length)
        batcher.submit(job)
        if key is not None:
            state.refused.pop(key, None)
        return job

    async def _answer(request: Request, job: Job, key: str | None, entry: Entry | None) -> Response:
        """Wait for the job's rewards, or drop its work if the client leaves first (and no retry waits)."""
        job.waiters += 1
        waiting = asyncio.ensure_future(job.wait())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            job.waiters -= 1
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
        if not waiting.done() or waiting.cancelled():
            if job.waiters == 0 and not job.finished:
                state.batcher.cancel(job)
                state.served["cancelled"] += 1
                log.info("client left; dropped the %d unscored item(s) of its request", job.missing)
            if entry is not None:
                state.jobs.changed(key, entry)
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        try:
            rewards = waiting.result()
        except ShuttingDown as exc:
            if entry is not None:
                state.jobs.drop(key, entry)
            raise _busy(str(exc), 2) from None
        except Exception as exc:
            if entry is not None:
                state.jobs.drop(key, entry)
            raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        if not all(math.isfinite(r) for r in rewards):
            raise HTTPException(500, "the reward model produced a non-finite reward; check the model and --dtype")
        if entry is not None and entry.answer is not None:  # a duplicate waiting with it answered first
            return _json(entry.answer)
        state.served["requests"] += 1
        state.served["items"] += len(rewards)
        state.served["truncated_items"] += job.cut
        answer = json.dumps({"rewards": rewards, "truncation": job.truncation}, separators=(",", ":")).encode()
        if entry is not None:
            state.jobs.answered(key, entry, answer)
        return _json(answer)

    return app
