"""The study's report from its run records: the project's table and plots, and a per-arm summary with spreads.

Writes into the results directory: ``table.md``/``table.tex`` (``python -m verl_tre.tables``), ``plots/``
(``python -m verl_tre.plots``: mean over seeds with a min-max band), and ``summary.md``/``summary.json``: per arm,
mean ± sd over seeds (n shown) of the held-out reward at the start, middle and end, the reference statistics at the
first and last step, response length, seconds per step, and the probe's mass outside the base model's top 10.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from experiments.real_lm import probe, study

# Row label -> (metric, which step): "first"/"last" training step, or a validation step chosen by position.
TRAIN_ROWS = (
    ("training reward, first 2 steps", "critic/score/mean", "head"),
    ("training reward, last 2 steps", "critic/score/mean", "tail"),
    ("full entropy (nats), first step", "actor/ref/entropy_full", "first"),
    ("full entropy (nats), last step", "actor/ref/entropy_full", "last"),
    ("mass outside top 2, first step", "actor/ref/tail_mass_top2", "first"),
    ("mass outside top 2, last step", "actor/ref/tail_mass_top2", "last"),
    ("mass outside top 10, first step", "actor/ref/tail_mass_top10", "first"),
    ("mass outside top 10, last step", "actor/ref/tail_mass_top10", "last"),
    ("nucleus size p=0.99, first step", "actor/ref/nucleus_size_p0.99", "first"),
    ("nucleus size p=0.99, last step", "actor/ref/nucleus_size_p0.99", "last"),
    ("response length, last step", "response_length/mean", "last"),
    ("seconds per step (mean)", "timing_s/step", "mean"),
)


def _pick(series, how: str) -> float | None:
    if series is None or not len(series):
        return None
    values = list(series.values)
    pick = {"first": values[:1], "last": values[-1:], "head": values[:2], "tail": values[-2:], "mean": values}[how]
    return float(sum(pick) / len(pick))


def run_numbers(run_dir: Path) -> dict:
    """One run's summary numbers (None where not logged)."""
    from verl_tre.runs.reading import read_run

    run = read_run(str(run_dir))
    out = {label: _pick(run.series(metric), how) for label, metric, how in TRAIN_ROWS}
    held_out = run.series(study.VAL_METRIC)
    steps = list(held_out.index) if held_out is not None else []
    for label, position in (("start", 0), ("middle", len(steps) // 2), ("end", -1)):
        out[f"held-out reward, {label}"] = float(held_out.iloc[position]) if steps else None
        out[f"held-out step, {label}"] = int(steps[position]) if steps else None
    result = run_dir / probe.PROBE_FILE
    if result.is_file():
        out["mass outside base top 10, after"] = json.loads(result.read_text())["mass_outside"]
    return out


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    digits = ".2e" if max(abs(v) for v in values) < 1e-2 else ".3f"
    mean = format(statistics.fmean(values), digits)
    if len(values) == 1:
        return f"{mean} (n=1)"
    return f"{mean} ± {format(statistics.stdev(values), digits)} (n={len(values)})"


def summary_table(settings: study.StudySettings, runs_dir: Path, base: dict | None) -> tuple[str, dict]:
    """Markdown table (one column per arm) and the per-run numbers behind it."""
    per_arm = {arm.label: [run_numbers(runs_dir / study.PlannedRun(arm, s).key) for s in settings.seeds
                           if (runs_dir / study.PlannedRun(arm, s).key / "metrics.jsonl").is_file()]
               for arm in settings.arms}
    per_arm = {label: runs for label, runs in per_arm.items() if runs}
    labels = [f"held-out reward, {w}" for w in ("start", "middle", "end")] + [r[0] for r in TRAIN_ROWS]
    labels.append("mass outside base top 10, after")
    header = "| | " + " | ".join(per_arm) + " |"
    lines = [header, "|---" * (len(per_arm) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_mean_sd([r.get(label) for r in runs]) for runs in per_arm.values()) + " |")
    if base:
        lines.append(f"| mass outside base top 10, before (the base model) | "
                     + " | ".join(f"{base['base_mass_outside']:.2e}" for _ in per_arm) + " |")
    return "\n".join(lines), per_arm


def write_report(results: Path, settings: study.StudySettings, out: Path | None = None) -> Path:
    """Table, plots and summary of the planned runs that have records, into ``out`` (default: ``results``);
    returns summary.md's path."""
    runs_dir = results / "runs"
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    dirs = [str(runs_dir / r.key) for r in study.plan(settings) if (runs_dir / r.key / "run.json").is_file()]
    if not dirs:
        raise FileNotFoundError(f"no run records under {runs_dir} yet; run the study first")
    for command in (["verl_tre.tables", *dirs, "--out-dir", str(out)],
                    ["verl_tre.plots", *dirs, "--out", str(out / "plots")]):
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"python -m {command[0]} failed: {done.stderr[-2000:]}")
    base_file = results / "base_probe.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    table, per_arm = summary_table(settings, runs_dir, base)
    settings_line = ", ".join(f"{k} {v}" for k, v in settings.run_settings().items())
    text = (f"# Real-LM study: summary\n\nSettings: {settings_line}; seeds {list(settings.seeds)}.\n"
            f"Mean ± sd over seeds (n = seeds with a record). Base probe: {json.dumps(base)}\n\n{table}\n")
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"settings": settings.run_settings(), "base_probe": base,
                                                      "runs": per_arm}, indent=2) + "\n")
    return out / "summary.md"
