"""The uvicorn server of the reward app: binds before the model loads, and answers 503 when it stops."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; raises OSError at once if the port is taken (before any model
    loads, which can take minutes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


class RewardServer(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to stop: the app then fails queued work with a JSON
    503 before uvicorn's grace period ends (past it uvicorn would cancel each request: a plain-text 500)."""

    def __init__(self, app: FastAPI, config: uvicorn.Config):
        super().__init__(config)
        self.reward_state = app.state.reward

    async def shutdown(self, sockets=None) -> None:
        self.reward_state.begin_stopping(self.config.timeout_graceful_shutdown or 0.0)
        await super().shutdown(sockets)
