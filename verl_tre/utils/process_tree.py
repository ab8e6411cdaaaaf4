"""Run a command as a child and leave nothing of it behind, Ctrl-C included.

A training launch starts a local Ray cluster whose daemons (raylet, GCS, dashboard and runtime-env agents) are
its descendants but not always in its process group, and some outlive their parent and ignore SIGTERM. So the
caller becomes a child subreaper (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``): every process the child leaves
orphaned is re-parented to the caller instead of init, and after the child has ended, ``run`` ends what is left
below the caller: SIGTERM, then SIGKILL for those still there after a grace period. Ctrl-C (SIGINT) is passed
on to the child's process group and the child is given time to shut its cluster down first. Processes of a Ray
cluster the child only joined (``RAY_ADDRESS``) are not its descendants and are never touched.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux); False where the system has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state letter)} of every process in /proc (empty without /proc)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses, so split after the last ')'.
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(entry.name)] = (int(ppid), state)
    return table


def live_descendants(root: int | None = None) -> list[int]:
    """PIDs of the live (not zombie) processes below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    table = _parents()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        frontier += children
        found += [pid for pid in children if table[pid][1] != "Z"]
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap() -> None:
    """Collect the exit status of every ended child (re-parented orphans included), so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_descendants(grace_s: float = 5.0) -> list[int]:
    """SIGTERM every live descendant of this process, SIGKILL those still there after ``grace_s``; returns the
    PIDs found. Call it only when no child of this process is meant to keep running."""
    pids = live_descendants()
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap()
        if not set(pids) & set(live_descendants()):
            break
        time.sleep(0.1)
    _signal_all(sorted(set(pids) & set(live_descendants())), signal.SIGKILL)
    time.sleep(0.1)
    _reap()
    return pids


def run(command: list[str], env: dict[str, str], interrupt_grace_s: float = 60.0, leftover_grace_s: float = 5.0) -> int:
    """Run ``command`` in its own session and return its exit status; end everything it left behind afterwards
    (``end_descendants(leftover_grace_s)``). On Ctrl-C the child's process group gets SIGINT and up to
    ``interrupt_grace_s`` to end before the rest is ended, then KeyboardInterrupt propagates."""
    child = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            os.killpg(child.pid, signal.SIGINT)
            child.wait(timeout=interrupt_grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        raise
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        end_descendants(leftover_grace_s)
