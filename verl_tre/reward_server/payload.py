"""Reading and checking a /predict body: its headers, its size and item count before it is decoded, then the
decoded request against the limits, each refusal an HTTPException whose detail names the problem and the fix.

Memory: a body is read only up to ``max_body_bytes``; its strings are counted on the raw bytes (no Python
objects: 31M empty strings in 90 MB would take about 2 GB once decoded), so too many items never get decoded;
the characters are counted on the decoded strings, before any tokenization.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from .settings import ServerSettings

PROTOCOL_HINT = 'expected a JSON object {"prompts": [str, ...], "responses": [str, ...]} with one response per prompt'
# Words of the JSON parser's errors for a lone surrogate escape ("\ud800"), a broken \u escape or non-UTF-8 bytes.
_UNICODE_ERRORS = ("surrogate", "hex escape", "unicode code point")


class PredictRequest(BaseModel):
    """The /predict body: one response per prompt, in order."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]
    responses: list[StrictStr]


class PredictAnswer(BaseModel):
    """The /predict answer: one reward per pair, in input order, and what truncation to max_length cut."""

    rewards: list[float]
    truncation: dict[str, int]


class ErrorDetail(BaseModel):
    """Every error answer: what went wrong and what fixes it."""

    detail: str


def check_headers(request: Request) -> None:
    """415 for a body that is not JSON or is compressed (the server reads plain bodies only)."""
    media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise HTTPException(415, f"Content-Type {request.headers.get('content-type')!r} is not JSON: send "
                                 f"'Content-Type: application/json' and {PROTOCOL_HINT}")
    encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise HTTPException(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed "
                                 "(no Content-Encoding header)")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes (declared or streamed)."""
    fix = f"max_body_bytes={limit} (12 x max_chars + 1 MiB); split the request or raise the server's --max-chars"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds {fix}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds {fix}")
        chunks.append(chunk)
    return b"".join(chunks)


def count_strings(body: bytes) -> int:
    """The number of JSON strings in ``body`` (exact for valid JSON), without decoding it.

    Inside a string every backslash starts a two-character escape; dropping the escaped backslashes first
    leaves each remaining backslash right before the character it escapes, so the quotes that delimit
    strings are those not preceded by one.
    """
    plain = body.replace(b"\\\\", b"")
    return (plain.count(b'"') - plain.count(b'\\"')) // 2


def check_items_before_decoding(body: bytes, settings: ServerSettings) -> None:
    """413 if the body holds more strings than a request within ``max_items`` can (two field names, then
    at most max_items prompts and as many responses)."""
    strings = count_strings(body)
    if strings > 2 + 2 * settings.max_items:
        raise HTTPException(413, f"the body holds {strings} strings, more than 2 x max_items={settings.max_items} "
                                 "prompts and responses; split the request or raise the server's --max-items")


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors()[:3]:
        where = ".".join(str(part) for part in err["loc"]) or "body"
        if err["type"] == "json_invalid" and any(w in err["msg"] for w in _UNICODE_ERRORS):
            problems.append(f"{where}: invalid unicode ({err['msg'].removeprefix('Invalid JSON: ')}): a lone UTF-16 "
                            "surrogate such as \\ud800, a broken \\u escape or bytes that are not UTF-8; send UTF-8 "
                            "text with surrogates paired or replaced by U+FFFD (the project's client does)")
        else:
            problems.append(f"{where}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"malformed request: {'; '.join(problems)}{more}; {PROTOCOL_HINT}"


def parse_request(body: bytes, settings: ServerSettings) -> PredictRequest:
    """Decode and check a body whose size and item count passed; 422 malformed, 413 over max_items or
    max_chars. Runs in a worker thread (decoding megabytes takes a while)."""
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
    return payload
