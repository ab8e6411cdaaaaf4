"""The FastAPI app: POST /predict scores (prompt, response) pairs, GET /health says whether it can.

Protocol: ``POST /predict {"prompts": [str], "responses": [str]}`` -> ``200 {"rewards": [float], "truncation":
{...}}`` in input order. Errors: 401 wrong or missing bearer token (when one is set), 413 over a limit, 422
malformed, 503 while the model loads or the server stops, 500 if scoring itself fails. Every error carries a
``detail`` that names the problem and the fix. The model loads in the background so /health answers at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from .batching import ShuttingDown, TokenBudgetBatcher
from .encoding import PairEncoder
from .settings import ServerSettings

log = logging.getLogger(__name__)

PROTOCOL_HINT = 'expected a JSON object {"prompts": [str, ...], "responses": [str, ...]} with one response per prompt'


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]
    responses: list[StrictStr]


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

    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
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
    batcher: TokenBudgetBatcher | None = None
    error: str | None = None
    served: dict[str, int] = field(default_factory=lambda: {"requests": 0, "items": 0, "truncated_items": 0})

    @property
    def ready(self) -> bool:
        return self.batcher is not None


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors()[:3]:
        where = ".".join(str(part) for part in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"malformed request: {'; '.join(problems)}{more}; {PROTOCOL_HINT}"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds max_body_bytes={limit} (12 x max_chars "
                                 "+ 1 MiB); split the request or raise --max-chars")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds max_body_bytes={limit} (12 x max_chars + 1 MiB); "
                                     "split the request or raise --max-chars")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: ServerSettings,
    loader: Callable[[ServerSettings], Loaded] = load_model,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. ``loader`` runs in a thread at startup; if it raises, /health reports the error with 503
    and ``on_load_failure`` (the CLI passes one that stops the server) is called."""
    state = _State(settings)

    async def load() -> None:
        try:
            loaded = await asyncio.to_thread(loader, settings)
        except Exception as exc:
            log.exception("loading the reward model failed")
            state.error = f"{type(exc).__name__}: {exc}"
            if on_load_failure is not None:
                on_load_failure()
            return
        state.loaded = loaded
        batcher = TokenBudgetBatcher(loaded.scorers, settings.batch_tokens)
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

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        expected = settings.token.get_secret_value().encode()
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the server's "
                "--token (REWARD_SERVER_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "ready": state.ready,
            "model": str(settings.model_path),
            "devices": state.loaded.devices if state.loaded else [],
            "replicas": len(state.loaded.scorers) if state.loaded else 0,
            "dtype": state.loaded.dtype if state.loaded else settings.dtype,
            "limits": settings.limits(),
            "auth": settings.token is not None,
            "served": dict(state.served),
            "forward_passes": state.batcher.forward_passes if state.batcher else 0,
            "error": state.error,
        }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.post("/predict", dependencies=[Depends(authorize)])
    async def predict(request: Request) -> dict:
        if not state.ready:
            why = f"loading the model failed: {state.error}" if state.error else "the model is still loading; retry"
            raise HTTPException(503, why, headers={"Retry-After": "2"})
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, _validation_message(exc)) from None
        n = len(payload.prompts)
        if n != len(payload.responses):
            raise HTTPException(422, f"prompts has {n} items but responses has {len(payload.responses)}; "
                                     "send exactly one response per prompt")
        if n == 0:
            raise HTTPException(422, "prompts and responses are empty; send at least one pair")
        if n > settings.max_items:
            raise HTTPException(413, f"{n} items exceed max_items={settings.max_items}; split the request "
                                     "or raise the server's --max-items")
        chars = sum(map(len, payload.prompts)) + sum(map(len, payload.responses))
        if chars > settings.max_chars:
            raise HTTPException(413, f"{chars} characters exceed max_chars={settings.max_chars}; split the "
                                     "request or raise the server's --max-chars")

        encoded = await asyncio.to_thread(state.loaded.encoder.encode, payload.prompts, payload.responses)
        try:
            rewards = await state.batcher.submit([e.ids for e in encoded])
        except ShuttingDown as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "2"}) from None
        except Exception as exc:
            raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        if not all(math.isfinite(r) for r in rewards):
            raise HTTPException(500, "the reward model produced a non-finite reward; check the model and --dtype")

        truncation = {
            "prompts": sum(e.prompt_tokens_dropped > 0 for e in encoded),
            "responses": sum(e.response_tokens_dropped > 0 for e in encoded),
            "prompt_tokens_dropped": sum(e.prompt_tokens_dropped for e in encoded),
            "response_tokens_dropped": sum(e.response_tokens_dropped for e in encoded),
        }
        cut = sum(e.prompt_tokens_dropped + e.response_tokens_dropped > 0 for e in encoded)
        if truncation["responses"]:
            log.warning("cut the head of %d response(s) to max_length=%d (prompts fully dropped first)",
                        truncation["responses"], settings.max_length)
        state.served["requests"] += 1
        state.served["items"] += n
        state.served["truncated_items"] += cut
        return {"rewards": rewards, "truncation": truncation}

    return app
