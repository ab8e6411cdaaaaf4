"""Run the tail-risk study (or resume it) and write its report.

    python -m experiments.tail_risk.run                       # full study, 4 seeds, 96 runs
    python -m experiments.tail_risk.run --quick               # pipeline check, a few minutes
    python -m experiments.tail_risk.run --report-only         # redraw table, plots, conclusion

Run from the repository root. Interrupt at any time: the same command resumes from the finished files.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent


def _worker_init() -> None:
    import torch

    # One thread per process: the processes, not BLAS threads, use the cores (small matrices scale badly).
    torch.set_num_threads(1)


def _call(job):
    fn, args = job
    return fn(*args)


def _execute(jobs, workers: int, desc: str) -> None:
    if not jobs:
        return
    if workers == 1:
        for job in tqdm(jobs, desc=desc):
            _call(job)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        for _ in tqdm(pool.imap_unordered(_call, jobs), total=len(jobs), desc=desc):
            pass


def run_study(cfg, results: Path, workers: int) -> Path:
    """Fills ``results`` with every missing warm start and run, then writes the report. Returns summary.md."""
    from . import study
    from .report import write_report

    study.prepare(results, cfg)
    sft_jobs = [(study.sft_job, (results, cfg, h)) for h in cfg.horizons if not study.sft_done(results, h)]
    _execute(sft_jobs, min(workers, max(len(sft_jobs), 1)), "warm starts")
    rl_jobs = [(study.rl_job, (results, cfg, spec)) for spec in cfg.runs() if not study.rl_done(results, spec)]
    _execute(rl_jobs, workers, "RL runs")
    return write_report(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps: checks the pipeline in minutes")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where runs, table and plots go (default: experiments/tail_risk/results[/quick])")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes (default 2)")
    parser.add_argument("--seeds", type=int, default=None, help="number of RL seeds (default 4; 1 with --quick)")
    parser.add_argument("--coeff", type=float, default=None, help="entropy coefficient of every regularized variant")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)

    from .study import StudyConfig

    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.coeff is not None:
        overrides["coeff"] = args.coeff
    try:
        cfg = StudyConfig.from_dict({**cfg.to_dict(), **overrides})
    except ValueError as err:
        parser.error(str(err))
    results = args.results_dir or (HERE / "results" / ("quick" if args.quick else ""))

    start = time.time()
    if args.report_only:
        from .report import write_report

        path = write_report(results)
    else:
        try:
            path = run_study(cfg, results, args.workers)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(f"{path}  ({time.time() - start:.0f} s on {args.workers} workers, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
