"""``python -m verl_tre.reward_server --model DIR``: serve a scalar reward model over HTTP.

The model directory may also come from HH_REWARD_MODEL_PATH and the bearer token from REWARD_SERVER_TOKEN
(better than --token, which other users can read in the process list); an empty token means no auth.
Binds 127.0.0.1:8888 by default; the port is bound before the model loads, so a taken one fails at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from .settings import MODEL_ENV, TOKEN_ENV, ServerSettings


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    defaults = ServerSettings.model_fields
    p = argparse.ArgumentParser(prog="python -m verl_tre.reward_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get(MODEL_ENV),
                   help=f"saved reward model directory (default: ${MODEL_ENV})")
    p.add_argument("--host", default=defaults["host"].default, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults["port"].default, help="(default %(default)s)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                   help=f"require 'Authorization: Bearer TOKEN' on /predict (default: ${TOKEN_ENV}, else none; "
                        "'' means none)")
    for name in ("max_items", "max_chars", "max_length", "batch_tokens", "chunk_tokens", "max_queue_tokens",
                 "idempotency_cache_bytes"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name].default,
                       help=f"{defaults[name].description} (default %(default)s)")
    p.add_argument("--devices", default="auto", help=defaults["devices"].description)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto is bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn-implementation", default="sdpa", help="transformers attention kernel (default sdpa)")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0, help=defaults["shutdown_grace_s"].description)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    args = p.parse_args(argv)
    if args.model is None:
        p.error(f"no model: pass --model DIR or set {MODEL_ENV}")
    values = vars(args)
    values["model_path"] = values.pop("model")
    try:
        return ServerSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        p.error(problems)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)  # fails fast, before torch and the model are loaded
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = settings.exposure_warning()
    if warning:
        logging.getLogger("verl_tre.reward_server").warning(warning)

    from .serve import bind

    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"reward server: cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); another "
              "server may hold the port: stop it or pass another --port (REWARD_SERVER_PORT)", file=sys.stderr)
        return 1

    import uvicorn

    from .app import create_app
    from .serve import RewardServer

    server: RewardServer | None = None

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    server = RewardServer(app, uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=settings.access_log, timeout_graceful_shutdown=settings.shutdown_grace_s,
    ))
    server.run(sockets=[sock])
    if app.state.reward.error:
        print(f"reward server: {app.state.reward.error}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
