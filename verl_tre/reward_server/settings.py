"""Validated settings of the HH reward server (one place for defaults, limits and their checks)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

MODEL_ENV = "HH_REWARD_MODEL_PATH"
TOKEN_ENV = "REWARD_SERVER_TOKEN"
# One of these next to config.json holds a vocabulary transformers can build a (fast) tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ServerSettings(BaseModel):
    """Everything the server needs, checked before any model is loaded.

    Units: ``max_chars`` counts Python characters summed over all prompts and responses of one request;
    ``max_length`` and ``batch_tokens`` count tokens; ``max_body_bytes`` is derived from ``max_chars``, and
    ``piece_chars`` (the most characters tokenized in one turn) from ``batch_tokens``.

    Memory: reading a request holds at most ``max_body_bytes``; too many items are refused before the body
    is decoded, too many characters before it is tokenized; tokenizing takes a few hundred bytes per token
    of the pair in hand, one long pair at a time (the worst request within the defaults, 2M emoji in one
    pair, peaked at +0.9 GB RSS; 2-core VM, 2026-12-03). What is kept for retries: ``idempotency_cache_bytes``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: Path = Field(description="Directory of a saved num_labels=1 sequence-classification model.")
    host: str = "127.0.0.1"
    port: int = Field(8888, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="Bearer token required on /predict when set.")
    max_items: int = Field(1024, ge=1, description="Most (prompt, response) pairs per request.")
    max_chars: int = Field(2_000_000, ge=1, description="Most characters per request, prompts and responses together.")
    max_length: int = Field(4096, ge=32, description="Most tokens per templated pair; longer ones are truncated.")
    batch_tokens: int = Field(32_768, ge=32, description="Padded tokens per forward pass (rows x longest row).")
    chunk_tokens: int = Field(256, ge=16, description="Pairs longer than this are scored alone, this many tokens "
                                                       "per forward pass, between the passes of shorter pairs.")
    max_queue_tokens: int = Field(262_144, ge=32, description="Tokens waiting to be scored beyond which new "
                                                              "requests get 503 with Retry-After.")
    idempotency_cache_bytes: int = Field(64 << 20, ge=0, description="Most bytes of answers kept for retries "
                                                                      "with an Idempotency-Key (oldest dropped "
                                                                      "first; each kept at most 600 s).")
    devices: str = Field("auto", description="'auto' (every visible GPU, else the CPU), 'cpu', or 'cuda:0,cuda:1'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str = "sdpa"
    shutdown_grace_s: float = Field(30.0, gt=0, description="Seconds in-flight requests get after SIGTERM.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True

    @field_validator("model_path")
    @classmethod
    def _model_dir_exists(cls, path: Path) -> Path:
        path = path.expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a saved model directory (no config.json); pass --model or set {MODEL_ENV} to the "
                "output of experiments/hh/reward/train_reward_model.py"
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(
                f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the "
                "reward model was trained with next to it: AutoTokenizer.from_pretrained(BASE).save_pretrained(DIR) "
                "(train_reward_model.py does this)"
            )
        return path

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, token):
        # Like an empty REWARD_SERVER_TOKEN: no token means no auth, not a token nothing can match.
        if token is None or (isinstance(token, str) and token == "") or (
                isinstance(token, SecretStr) and token.get_secret_value() == ""):
            return None
        return token

    @field_validator("devices")
    @classmethod
    def _devices_syntax(cls, devices: str) -> str:
        devices = devices.strip()
        if devices in ("auto", "cpu"):
            return devices
        names = [d.strip() for d in devices.split(",")]
        if not all(n.startswith("cuda:") and n[5:].isdigit() for n in names):
            raise ValueError(f"devices={devices!r}: use 'auto', 'cpu' or a comma list such as 'cuda:0,cuda:1'")
        return ",".join(names)

    @model_validator(mode="after")
    def _budget_holds_one_item(self) -> "ServerSettings":
        if self.batch_tokens < self.max_length:
            raise ValueError(
                f"batch_tokens={self.batch_tokens} is below max_length={self.max_length}: one full-length item "
                "must fit in a forward pass; raise --batch-tokens or lower --max-length"
            )
        if self.chunk_tokens > self.batch_tokens:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} exceeds batch_tokens={self.batch_tokens}; lower "
                             "--chunk-tokens")
        return self

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def exposure_warning(self) -> str | None:
        """A warning when other machines can reach a server that takes no token, else None."""
        if self.token is None and not self.loopback:
            return (f"binding {self.host} without a token: anyone who can reach port {self.port} can make this "
                    f"server compute; set {TOKEN_ENV} (or --token) or bind 127.0.0.1")
        return None

    @property
    def max_body_bytes(self) -> int:
        """Request bodies above this are refused unread: a character costs at most 12 bytes as JSON (a
        surrogate-pair escape), plus room for the envelope."""
        return 12 * self.max_chars + (1 << 20)

    @property
    def piece_chars(self) -> int:
        """Characters tokenized in one turn (about a forward pass of text at 4 characters per token): another
        request waits at most this long for the tokenizer."""
        return 4 * self.batch_tokens

    def limits(self) -> dict[str, int]:
        return {
            "max_items": self.max_items,
            "max_chars": self.max_chars,
            "max_length": self.max_length,
            "batch_tokens": self.batch_tokens,
            "chunk_tokens": self.chunk_tokens,
            "max_queue_tokens": self.max_queue_tokens,
            "max_body_bytes": self.max_body_bytes,
            "idempotency_cache_bytes": self.idempotency_cache_bytes,
        }
