"""Run the reward server on a background thread of this process (tests, notebooks, benchmarks)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from verl_tre.utils.reward_score.hh import RewardServerError, check_reward_server

from .settings import ServerSettings


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, timeout_s: float = 120.0, alive=lambda: True, token: str | None = None) -> dict:
    """Poll ``base_url``/health (no proxy for loopback) until it answers ready; returns the answer, raises
    RuntimeError naming the last answer if the server stops, fails to load or is not ready in ``timeout_s``."""
    try:
        return check_reward_server(base_url, token=token or "", timeout_s=timeout_s, alive=alive)
    except RewardServerError as exc:
        raise RuntimeError(str(exc)) from None


@contextmanager
def serve_in_background(settings: ServerSettings, timeout_s: float = 120.0, **app_kwargs) -> Iterator[str]:
    """Start a real uvicorn server for ``settings`` (``app_kwargs`` go to create_app, e.g. a loader) on a
    socket bound as the CLI binds it, wait until it is ready, yield its base URL (``http://host:port``), and
    always stop it (in-flight requests get the grace period)."""
    import uvicorn

    from .app import create_app
    from .serve import RewardServer, bind

    sock = bind(settings.host, settings.port)
    app = create_app(settings, **app_kwargs)
    server = RewardServer(app, uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                              access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="reward-server", daemon=True)
    thread.start()
    base_url = f"http://{settings.host}:{settings.port}"
    token = settings.token.get_secret_value() if settings.token else None
    try:
        wait_until_ready(base_url, timeout_s, alive=thread.is_alive, token=token)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=settings.shutdown_grace_s + 5)
