"""The uvicorn server of the reward app: binds before the model loads, and answers 503 when it stops."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises OSError at once if the port is taken (before any model
    loads, which can take minutes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol must say TCP (socket.create_server leaves it 0): asyncio turns Nagle off only on accepted
    # sockets whose protocol is IPPROTO_TCP. With Nagle on, the body write of each response waits for the
    # client's delayed ACK of the headers, about 40 ms per request on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class RewardServer(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to stop: the app then fails queued work with a JSON
    503 before uvicorn's grace period ends (past it uvicorn would cancel each request: a plain-text 500)."""

    def __init__(self, app: FastAPI, config: uvicorn.Config):
        super().__init__(config)
        self.reward_state = app.state.reward

    async def shutdown(self, sockets=None) -> None:
        self.reward_state.begin_stopping(self.config.timeout_graceful_shutdown or 0.0)
        await super().shutdown(sockets)
