"""Waiting for the HH reward server before scoring, visibly: a line naming it, then the seconds waited."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm


class _WaitReport:
    """``check_reward_server``'s per-look hook: after the first look fails, one line saying what the evaluation
    waits for, then a progress bar of the seconds waited (or nothing more, without progress)."""

    def __init__(self, url: str, deadline_s: float, progress: bool):
        self.url, self.deadline_s, self.progress = url, deadline_s, progress
        self.start, self.looks, self.bar = time.monotonic(), 0, None

    def __call__(self) -> bool:
        self.looks += 1
        if self.looks == 2:
            print(f"waiting for the HH reward server at {self.url} (GET /health) to be ready, for up to "
                  f"{self.deadline_s:g} s (the reward option hh_deadline); start it with HH_REWARD_MODEL_PATH=DIR "
                  f"bash experiments/hh/reward/run_with_server.sh", file=sys.stderr)
            self.bar = tqdm(total=round(self.deadline_s), desc="waiting for the reward server", unit="s",
                            disable=not self.progress, bar_format="{desc}: {n:.0f}/{total} s {bar}")
        if self.bar is not None:
            self.bar.n = min(round(time.monotonic() - self.start), self.bar.total)
            self.bar.refresh()
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_for_reward_server(reward_kwargs: dict[str, Any] | None = None, progress: bool = True) -> None:
    """Return once the HH reward server that ``reward_kwargs`` (``hh_url``, ``hh_token``) name is ready; while it
    is not, say so and show the wait. Raises RewardServerError (one line: what it last saw, how to start the
    server) after ``hh_deadline`` seconds, or at once for a wrong token or a model that failed to load."""
    from verl_tre.utils.reward_score import RewardOptions
    from verl_tre.utils.reward_score import hh

    options = RewardOptions(**(reward_kwargs or {}))
    url = options.hh_url or os.environ.get(hh.URL_ENV) or hh.DEFAULT_URL
    report = _WaitReport(url, options.hh_deadline, progress)
    try:
        hh.check_reward_server(url, options.hh_token, timeout_s=options.hh_deadline, alive=report)
    finally:
        report.close()
