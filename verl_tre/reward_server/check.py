"""``python -m verl_tre.reward_server.check [URL] [--timeout S] [--pid PID]``: exit 0 once the HH reward server
is ready (and takes ``$REWARD_SERVER_TOKEN`` if it needs a token), else 1 with the reason on stderr.

URL is the server's /predict or base URL (default ``$REWARD_SERVER_URL``, else http://127.0.0.1:8888/predict).
No proxy is used for a server on this machine. The shell face of
:func:`verl_tre.utils.reward_score.hh.check_reward_server`.
"""

from __future__ import annotations

import argparse
import os
import sys

from verl_tre.utils.reward_score.hh import RewardServerError, check_reward_server


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m verl_tre.reward_server.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", help="the server's /predict or base URL")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for ready (default: one look)")
    p.add_argument("--pid", type=int, help="give up as soon as this process (the server) has exited")
    args = p.parse_args(argv)
    if args.timeout < 0:
        p.error("--timeout must be >= 0")
    alive = (lambda: _running(args.pid)) if args.pid is not None else None
    try:
        health = check_reward_server(args.url, timeout_s=args.timeout, alive=alive)
    except RewardServerError as error:
        print(f"reward server check failed: {error}", file=sys.stderr)
        return 1
    print(f"reward server ready: devices={health.get('devices')} replicas={health.get('replicas')} "
          f"auth={health.get('auth')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
