"""Training curves per (task, model size), one line per seed group, as PNG and PDF.

``python -m verl_tre.plots RUN_DIRS... --out DIR [--smooth W]``

Panels: training reward, validation score, response length and the reference statistics (full entropy, top-1
probability, mass outside the top 2 and top 10 tokens, p = 0.99 nucleus size), which mean the same for every
method, and last the regularizer's own value, labelled as method-specific. A seed group (runs that differ only in
the seed, see verl_tre/runs/groups.py) is drawn as the mean over its seeds with a min-max band, its legend entry
saying n; a metric no run logged leaves its panel marked "not logged".
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from verl_tre.eval.files import atomic_path
from verl_tre.runs.groups import RunGroup, group_runs
from verl_tre.runs.reading import TASK_LABELS, Run, print_note, read_runs

# (title, y-axis label with units, metric names tried in order); None stands for the run's core validation key.
# Older records' names come second where they meant the same for every method.
PANELS: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("Training reward", "mean reward per response", ("critic/score/mean",)),
    ("Validation score", "score (0/1 tasks: fraction correct)", None),
    ("Response length", "tokens", ("response_length/mean",)),
    ("Full entropy", "nats", ("actor/ref/entropy_full", "actor/entropy_full")),
    ("Top-1 probability", "probability", ("actor/ref/top1_prob",)),
    ("Mass outside the top 2 tokens", "probability", ("actor/ref/tail_mass_top2",)),
    ("Mass outside the top 10 tokens", "probability", ("actor/ref/tail_mass_top10",)),
    ("Nucleus size, p = 0.99", "tokens", ("actor/ref/nucleus_size_p0.99",)),
    ("Regularizer value (method-specific)", "value of each method's own term", ("actor/regularizer/value", "actor/tre_value")),
]
LINESTYLES = ("-", "--", ":", "-.")
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


def _styles(groups: list[RunGroup]) -> list[tuple[str | None, str]]:
    """(color, line style) per group: the method's color, a new line style for each further group of a method."""
    seen: dict[str, int] = defaultdict(int)
    styles = []
    for g in groups:
        styles.append((COLORS.get(g.method), LINESTYLES[seen[g.method] % len(LINESTYLES)]))
        seen[g.method] += 1
    return styles


def plot_group(
    runs: list[Run], title: str, smooth: int = 1, data_source: str | None = None, groups: list[RunGroup] | None = None
) -> plt.Figure:
    """One figure (3 x 3 panels) for runs sharing a task and model size; ``groups``: their seed groups (default:
    group_runs(runs), whose labels name the options that differ among these runs only)."""
    groups = group_runs(runs) if groups is None else groups
    fig, axes = plt.subplots(3, 3, figsize=(16, 12), constrained_layout=True)
    for ax, (panel, ylabel, names) in zip(axes.flat, PANELS):
        drawn = False
        for g, (color, style) in zip(groups, _styles(groups)):
            series = [s for r in g.runs if (s := _run_series(r, names, data_source)) is not None]
            if not series:
                continue
            frame = pd.concat(series, axis=1).sort_index()
            if smooth > 1:
                frame = frame.rolling(smooth, min_periods=1).mean()
            mean = frame.mean(axis=1)
            # Validation happens every few steps: markers keep sparse curves readable.
            ax.plot(mean.index, mean.values, label=f"{g.label} (n={len(series)})", color=color, ls=style,
                    marker="o" if names is None else None, ms=3)
            if len(series) > 1:
                ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=color, alpha=0.2, lw=0)
            drawn = True
        ax.set_title(panel)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"{title}: mean over seeds (n per line), band min-max; token means over the responses")
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
    figures: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        figures[(r.task or "unknown", r.size_label)].append(r)
    # Labels over all runs, so a line reads the same in every figure and the table.
    seed_groups = group_runs(runs)
    paths = []
    for (task, size), members in sorted(figures.items()):
        title = f"{TASK_LABELS.get(task, task)}, {size}"
        ids = {id(r) for r in members}
        mine = [g for g in seed_groups if id(g.runs[0]) in ids]
        fig = plot_group(members, title, smooth=smooth, data_source=data_source, groups=mine)
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
