"""Run a grid of experiments - scripts x coefficients x seeds (x any script variable) - one after another.

    python -m verl_tre.trainer.sweep experiments/countdown/1.5b_ppo.sh experiments/countdown/1.5b_ppo_tre_k.sh \\
        --set ENTROPY_COEFF=0.001,0.01 --seeds 1,2,3 [--dry-run] [-- HYDRA_OVERRIDES...]

Each combination runs its script (experiments/<task>/<size>_ppo*.sh) with the variables in its environment and
``verl_tre.seed=<seed>`` plus the overrides appended, as a separate process: a failed run does not stop the
others, and on an existing Ray cluster (``RAY_ADDRESS`` set, ``ray start`` done) every run joins it. Every run
gets its own directory (its name follows from its training configuration, see verl_tre/runs/identity.py); the
plan printed first lists them with what each will do, and the end prints the commands that tabulate and plot the
grid. Rerunning the same command skips the finished runs (their run.json says so) and resumes the unfinished ones
from their latest checkpoint. Ctrl-C (or SIGTERM) stops the current run and everything it started, its local
Ray cluster included (verl_tre/utils/process_tree.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from verl_tre.runs import identity, resume
from verl_tre.trainer import config_check, main_ppo
from verl_tre.utils import process_tree

_SCRIPT_VARIABLES = ("ENTROPY_COEFF", "K", "P", "MODEL_PATH", "CRITIC_PATH", "DATA_DIR")


@dataclass
class Job:
    script: str
    env: dict[str, str]
    overrides: list[str]
    name: str
    run_dir: Path
    state: str  # what its launch will do: resume.Launch.describe(), or why it will be refused
    finished: bool


def _values(text: str) -> tuple[str, list[str]]:
    """'ENTROPY_COEFF=0.001,0.01' -> ('ENTROPY_COEFF', ['0.001', '0.01'])."""
    name, sep, values = text.partition("=")
    if not sep or not values or name not in _SCRIPT_VARIABLES:
        raise ValueError(f"--set takes NAME=V1,V2,... with NAME one of {', '.join(_SCRIPT_VARIABLES)}; got {text!r}")
    return name, [v for v in values.split(",") if v]


def script_overrides(script: str, env: dict[str, str], extra: list[str]) -> list[str]:
    """The Hydra overrides ``bash script extra...`` passes to the entry point (experiments/common.sh prints them)."""
    out = subprocess.run(["bash", script, *extra], env={**os.environ, **env, "VERL_TRE_PRINT_ARGS": "1"},
                         capture_output=True, check=True, timeout=120)
    return out.stdout.decode().split("\0")[:-1]


def plan(scripts: list[str], variables: dict[str, list[str]], seeds: list[int], overrides: list[str]) -> list[Job]:
    """Every combination, composed and validated offline (no data files or devices needed), with what its launch
    will do with its directory."""
    for script in scripts:
        if not os.path.isfile(script):
            raise ValueError(f"script {script} does not exist (one of experiments/<task>/<size>_ppo*.sh)")
    jobs = []
    names = list(variables)
    for script, values, seed in itertools.product(scripts, itertools.product(*variables.values()), seeds):
        env = dict(zip(names, values))
        extra = [*overrides, f"{identity.SEED_KEY}={seed}"]
        config = main_ppo.compose_config(script_overrides(script, env, extra))
        main_ppo.prepare(config, launching=False)
        try:
            launch = resume.decide(config)
            state, finished = launch.describe(), launch.action == "finished"
        except config_check.ConfigError as refused:  # its own launch reports it in full; the others still run
            state, finished = f"will be refused: {str(refused).splitlines()[0]}", False
        jobs.append(Job(script, env, extra, str(config.trainer.experiment_name), identity.run_dir(config), state,
                        finished))
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.run_dir in seen:
            raise ValueError(f"{job.script} {job.env} and {seen[job.run_dir].script} {seen[job.run_dir].env} would "
                             f"share {job.run_dir}: an explicit trainer.experiment_name or default_local_dir "
                             f"override gives every run the same directory; drop it")
        seen[job.run_dir] = job
    return jobs


def _describe(job: Job) -> str:
    settings = " ".join(f"{k}={v}" for k, v in job.env.items())
    return f"{job.script} {settings} {' '.join(job.overrides)}".replace("  ", " ").strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m verl_tre.trainer.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("scripts", nargs="+", help="experiment scripts (experiments/<task>/<size>_ppo*.sh)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"values of a script variable ({', '.join(_SCRIPT_VARIABLES)}); repeatable")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (names and directories) and stop")
    args = p.parse_args(argv)
    try:
        variables = dict(_values(text) for text in args.set)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        jobs = plan(args.scripts, variables, seeds, overrides)
    except (ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[sweep] {len(jobs)} run(s):")
    for i, job in enumerate(jobs, 1):
        print(f"  [{i}/{len(jobs)}] {job.run_dir}\n        {_describe(job)}\n        {job.state}")
    if args.dry_run:
        return 0
    # SIGTERM ends the sweep the way Ctrl-C does: the current run and everything it started are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    process_tree.become_subreaper()
    failed = []
    for i, job in enumerate(jobs, 1):
        if job.finished:
            print(f"[sweep] run {i}/{len(jobs)} skipped, {job.state}: {job.run_dir}", flush=True)
            continue
        print(f"[sweep] run {i}/{len(jobs)}: {job.name}", flush=True)
        start = time.time()
        try:
            code = process_tree.run(["bash", job.script, *job.overrides], {**os.environ, **job.env})
        except KeyboardInterrupt:
            print(f"[sweep] interrupted during run {i}/{len(jobs)}; it and its Ray processes are stopped. Rerun the "
                  f"same command to resume it (from its latest checkpoint) and run the rest.", flush=True)
            return 130
        status = "done" if code == 0 else f"FAILED (exit {code})"
        print(f"[sweep] run {i}/{len(jobs)} {status} in {time.time() - start:.0f} s: {job.run_dir}", flush=True)
        if code:
            failed.append(job)
    dirs = " ".join(str(job.run_dir) for job in jobs)
    print(f"[sweep] {len(jobs) - len(failed)} of {len(jobs)} run(s) finished.")
    for job in failed:
        print(f"  failed: {_describe(job)}")
    print(f"[sweep] table: python -m verl_tre.tables {dirs}\n[sweep] plots: python -m verl_tre.plots {dirs} --out plots")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
