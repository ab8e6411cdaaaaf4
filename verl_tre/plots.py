"""Training curves per (task, model size), one line per method, as PNG and PDF.

``python -m verl_tre.plots RUN_DIRS... --out DIR [--smooth W]``

Panels: training reward, validation score, full entropy, TRE value, top-1 probability and tail mass.
Several runs of one method (seeds) are drawn as their mean with a min-max band; a metric no run logged
leaves its panel marked "not logged".
"""

from __future__ import annotations

import argparse
import sys
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import pandas as pd

from verl_tre.eval.files import atomic_path
from verl_tre.runs import METHODS, TASK_LABELS, Run, print_note, read_runs

# (title, metric names tried in order); None stands for the run's core validation key.
PANELS: list[tuple[str, tuple[str, ...] | None]] = [
    ("Training reward", ("critic/score/mean",)),
    ("Validation score", None),
    ("Full entropy (nats)", ("actor/entropy_full", "actor/entropy")),
    ("TRE value", ("actor/tre_value",)),
    ("Top-1 probability", ("actor/topk_prob",)),
    ("Tail mass", ("actor/tail_mass",)),
]
COLORS = {
    "ppo": "#7f7f7f",
    "entropy": "#d62728",
    "forking_tokens": "#1f77b4",
    "kl_cov": "#9467bd",
    "tre_k": "#2ca02c",
    "tre_p": "#17becf",
}


def _run_series(run: Run, names: tuple[str, ...] | None, data_source: str | None) -> pd.Series | None:
    if names is None:
        key = run.validation_key(data_source)
        return run.series(key) if key else None
    return run.series(*names)


def plot_group(runs: list[Run], title: str, smooth: int = 1, data_source: str | None = None) -> plt.Figure:
    """One figure (2 x 3 panels) for runs sharing a task and model size."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    by_method: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_method[r.method or "unknown"].append(r)
    order = [m for m in METHODS if m in by_method] + sorted(set(by_method) - set(METHODS))
    for ax, (panel, names) in zip(axes.flat, PANELS):
        drawn = False
        for method in order:
            series = [s for r in by_method[method] if (s := _run_series(r, names, data_source)) is not None]
            if not series:
                continue
            frame = pd.concat(series, axis=1).sort_index()
            if smooth > 1:
                frame = frame.rolling(smooth, min_periods=1).mean()
            label = METHODS.get(method, method) + (f" (n={len(series)})" if len(series) > 1 else "")
            color = COLORS.get(method)
            mean = frame.mean(axis=1)
            # Validation happens every few steps: markers keep sparse curves readable.
            ax.plot(mean.index, mean.values, label=label, color=color, marker="o" if names is None else None, ms=3)
            if len(series) > 1:
                ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=color, alpha=0.2, lw=0)
            drawn = True
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title)
    return fig


def save_figure(fig: plt.Figure, stem: str) -> list[str]:
    """Write ``stem``.png and ``stem``.pdf atomically; return the paths."""
    paths = []
    for ext in ("png", "pdf"):
        path = f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths


def make_plots(runs: list[Run], out_dir: str, smooth: int = 1, data_source: str | None = None) -> list[str]:
    """One figure per (task, model size) in ``out_dir``, named ``<task>_<size>.{png,pdf}`` (runs without a
    model size under "other_size"); returns the paths."""
    if smooth < 1:
        raise ValueError(f"smooth is a window length in steps and must be >= 1, got {smooth}")
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.task or "unknown", r.size_label)].append(r)
    paths = []
    for (task, size), members in sorted(groups.items()):
        title = f"{TASK_LABELS.get(task, task)}, {size}"
        fig = plot_group(members, title, smooth=smooth, data_source=data_source)
        paths += save_figure(fig, os.path.join(out_dir, f"{task}_{size.replace(' ', '_')}"))
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m verl_tre.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="training run directories, or folders holding them")
    p.add_argument("--out", required=True, help="directory for the figures")
    p.add_argument("--smooth", type=int, default=1, help="rolling-mean window in steps (default 1: raw)")
    p.add_argument("--data-source", help="validation data source to plot (substring); default: the task's main one")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    for path in make_plots(read_runs(args.run_dirs, report=print_note), args.out, args.smooth, args.data_source):
        print(path)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad input: the message says what to fix
        sys.exit(f"error: {error}")
