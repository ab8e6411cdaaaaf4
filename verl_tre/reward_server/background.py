"""Run the reward server on a background thread of this process (tests, notebooks, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from .settings import ServerSettings


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, timeout_s: float = 120.0, alive=lambda: True) -> dict:
    """Poll ``base_url``/health until it answers 200; raise TimeoutError naming the last answer."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the reward server at {base_url} stopped before it was ready (last: {last})")
        try:
            response = httpx.get(f"{base_url}/health", timeout=5.0)
            if response.status_code == 200:
                return response.json()
            if response.headers.get("content-type", "").startswith("application/json") and response.json().get("error"):
                raise RuntimeError(f"the reward server at {base_url} failed to load: {response.json()['error']}")
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise TimeoutError(f"the reward server at {base_url} was not ready after {timeout_s:.0f} s (last: {last})")


@contextmanager
def serve_in_background(settings: ServerSettings, timeout_s: float = 120.0) -> Iterator[str]:
    """Start a real uvicorn server for ``settings``, wait until it is ready, yield its base URL
    (``http://host:port``), and always stop it (in-flight requests finish first)."""
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="reward-server", daemon=True)
    thread.start()
    base_url = f"http://{settings.host}:{settings.port}"
    try:
        wait_until_ready(base_url, timeout_s, alive=thread.is_alive)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=settings.shutdown_grace_s + 5)
