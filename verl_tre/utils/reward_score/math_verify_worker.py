"""math-verify behind a watchdog: a child process that is killed when one comparison runs too long.

math-verify 0.9.0 bounds its own work with ``signal.alarm``, which raises outside the main thread (Ray
actors, thread pools). Here its timeouts are switched off and the bound is enforced from outside instead:
each process that asks gets one long-lived child (``python -m`` this module) speaking JSON lines over
stdin/stdout; a comparison that misses its deadline kills the child, counts as "not equal", and the next
call starts a fresh one. Calls from several threads are serialized on a lock.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading

_START_TIMEOUT_S = 120.0  # importing sympy on a loaded machine can take tens of seconds
_READY = "ready"
_MODULE = "verl_tre.utils.reward_score.math_verify_worker"


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        if self._read_line(proc, _START_TIMEOUT_S) != _READY:
            self._kill(proc)
            raise RuntimeError(
                f"the math-verify worker ({sys.executable} -m {_MODULE}) did not start within {_START_TIMEOUT_S:.0f} s; "
                "check that math-verify is installed (pip install math-verify==0.9.0) or drop math_verify=True"
            )
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.strip() if line else None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()

    def equal(self, answer: str, reference: str, timeout: float) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write(json.dumps([answer, reference]) + "\n")
                self._proc.stdin.flush()
                reply = self._read_line(self._proc, timeout)
            except (BrokenPipeError, OSError):
                reply = None
            if reply in ("true", "false"):
                return reply == "true"
            # Late, missing or garbled: this comparison failed and the worker cannot be trusted any more.
            self._kill(self._proc)
            self._proc = None
            return False

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


_WATCHDOG = _Watchdog()
atexit.register(_WATCHDOG.close)


def verify_equal(answer: str, reference: str, timeout: float = 5.0) -> bool:
    """Whether math-verify proves ``answer`` equal to ``reference`` (both bare LaTeX, no ``\\boxed``).

    Thread-safe; returns False when the comparison takes longer than ``timeout`` seconds.
    """
    if timeout <= 0:
        raise ValueError(f"math_verify_timeout must be positive seconds, got {timeout}")
    return _WATCHDOG.equal(answer, reference, timeout)


def _serve() -> None:
    import logging

    # The protocol gets its own copy of fd 1; fd 1 itself then points at stderr, so nothing a library
    # prints (from Python or C) can corrupt the stream.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    protocol.write(_READY + "\n")
    protocol.flush()
    for line in sys.stdin:
        answer, reference = json.loads(line)
        try:
            gold = parse("\\boxed{" + reference + "}", parsing_timeout=None)
            pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
            same = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # a comparison math-verify cannot make is a mismatch, not a crash
            same = False
        protocol.write(json.dumps(bool(same)) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
