"""One writer per run directory: a live launch holds ``run.lock`` in its directory until it ends.

The lock is a POSIX record lock (``fcntl.lockf``, i.e. ``fcntl(F_SETLK)``) on the whole file, taken by the
launching process (the driver, which waits in ``run_ppo`` while verl's trainer runs in its Ray actor) before Ray
starts and held until the trainer returns. The kernel drops it when that process ends in any way, SIGKILL
included, so a crash never leaves a stale lock; a killed trainer actor makes ``run_ppo`` raise in the driver,
which then ends and releases it, and Ray ends a killed driver's actors with it. Record locks are the kind NFS
carries between machines (NFSv4 natively, v3 through lockd), so launches on two nodes that share the directory
exclude each other too; on NFS a lock held by a machine that dies is freed when the server's lease runs out. The
file itself says who holds it (host, pid, start time, command) for the message a refused launch prints; it is
emptied on release and never deleted (deleting would let a third launch lock a new file while the second still
holds the old one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from verl_tre.trainer.config_check import ConfigError

LOCK_FILE = "run.lock"
# Record locks belong to a process: a second lock of the same file in this process would succeed, and closing any
# other descriptor of it would drop the first. So this process tracks its own locks and never reopens them.
_HELD: dict[str, int] = {}


def holder(run_dir: str | os.PathLike) -> dict | None:
    """What ``run.lock`` of ``run_dir`` says about the process holding it (None when empty or unreadable).
    Only for messages: whether a lock is held is what ``hold`` finds out."""
    path = os.path.abspath(os.path.join(run_dir, LOCK_FILE))
    if path in _HELD:
        return {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def _busy(run_dir: Path) -> str:
    info = holder(run_dir) or {}
    host, pid = info.get("host", "an unknown host"), info.get("pid", "unknown")
    since = f", running since {info['started']}" if info.get("started") else ""
    return (f"{run_dir} is being written by another launch of this run: pid {pid} on host {host}{since} holds "
            f"{run_dir / LOCK_FILE}. Wait for that run to end (or stop it: kill {pid} on {host}) and relaunch to "
            f"resume it, or train into a new directory (trainer.experiment_name=<new name> or "
            f"trainer.default_local_dir=<dir>).")


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the ``with`` block (creating the directory); ConfigError naming the holder and
    the ways out when another live process holds it."""
    run_dir = Path(os.path.abspath(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = str(run_dir / LOCK_FILE)
    if path in _HELD:
        raise ConfigError(_busy(run_dir))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)  # this process holds no lock on the file, so closing drops nothing
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(_busy(run_dir)) from None
        raise
    _HELD[path] = fd
    try:
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": sys.argv}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield run_dir
    finally:
        del _HELD[path]
        os.ftruncate(fd, 0)
        os.close(fd)
