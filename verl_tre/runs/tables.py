"""The paper's results table from local run records: methods x (task, model size), Markdown and LaTeX.

``python -m verl_tre.tables RUN_DIRS... [--pick final|best] [--paper-grid] [--out-dir DIR]``

The table has the rows and columns that have runs (a task or model size outside the paper's is a column of its
own), ``—`` marking a row's missing cells; ``--paper-grid`` shows all six methods and the paper's six task x size
columns. A row is a method plus what tells its runs apart ("TRE-K (K=2, coeff 0.001)", "PPO (lr 1e-3)", see
verl_tre/runs/groups.py); a cell is a
run's validation score at its last validation (``final``) or its best one (``best``), averaged over the seeds of
one seed group (runs that differ only in the seed: mean ± sample sd and n when there are several; older records
without seed fields are grouped by method, task and size). MATH and Countdown rewards are 0/1, shown as
percentages; HH shows the reward model's score. The paper's recovered figures are listed beside our best cell per
task. A second table gives each group's training statistics at its last logged step, all of them quantities that
mean the same for every method (the reference statistics, response length), and the regularizer's own value,
labelled as method-specific. When the runs of one column end at different steps, a note under the table says
which row ends where.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
from dataclasses import dataclass

from verl_tre.eval.files import write_text
from verl_tre.runs.groups import group_runs
from verl_tre.runs.methods import METHODS
from verl_tre.runs.reading import MODEL_SIZES, TASK_LABELS, TASKS, Run, print_note, read_runs

PERCENT_TASKS = {"math", "countdown"}  # 0/1 rewards: mean reward is pass@1, shown in percent
# Published numbers recovered so far (best entries; model size not recovered): task -> (metric, value).
PAPER = {"math": ("MATH test pass@1 (%)", 74.29), "hh": ("HH test reward", 3.8764)}

NO_RUN = "—"
NO_VAL = "no val"


@dataclass
class Cell:
    """The runs of one (method, task, size) cell and their per-run scores (None: never validated)."""

    runs: list[Run]
    scores: list[float | None]

    @property
    def values(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None


def run_score(run: Run, pick: str = "final", data_source: str | None = None) -> float | None:
    """A run's validation score (display units: percent for 0/1 tasks): last or best over validations."""
    if pick not in ("final", "best"):
        raise ValueError(f"pick must be 'final' or 'best', got {pick!r}")
    key = run.validation_key(data_source)
    series = run.series(key) if key else None
    if series is None:
        return None
    value = float(series.iloc[-1] if pick == "final" else series.max())
    return value * 100 if run.task in PERCENT_TASKS else value


def _row_labels(groups, paper_grid: bool) -> list[str]:
    """Row labels: each group's, in the paper's method order; with ``paper_grid`` a paper method without runs
    keeps a row of its own, so gaps stay visible."""
    rows: list[str] = []
    present = {g.method for g in groups}
    for method in [*METHODS, *sorted(present - set(METHODS))]:
        labels = [g.label for g in groups if g.method == method]
        if not labels and paper_grid and method in METHODS:
            labels = [METHODS[method]]
        rows += list(dict.fromkeys(labels))
    return rows


def _column_order(column: tuple[str, str | None]) -> tuple:
    """The paper's tasks and sizes first, in its order; the others after them, alphabetically."""
    task, size = column
    return (TASKS.index(task) if task in TASKS else len(TASKS), task,
            MODEL_SIZES.index(size) if size in MODEL_SIZES else len(MODEL_SIZES), str(size))


def build_cells(
    runs: list[Run], pick: str = "final", data_source: str | None = None, paper_grid: bool = False
) -> tuple[list[str], list[tuple[str, str | None]], dict[tuple[str, str, str | None], Cell]]:
    """(row labels, (task, size) columns grouped by task, cells keyed by (row label, task, size)). A row is a seed
    group's label (see verl_tre.runs.groups); rows and columns are those that have runs, and with ``paper_grid``
    also the paper's six methods and six task x size combinations."""
    groups = group_runs(runs)
    columns = {(r.task or "unknown", r.model_size) for r in runs}
    if paper_grid:
        columns |= {(t, s) for t in TASKS for s in MODEL_SIZES}
    cells: dict[tuple[str, str, str | None], Cell] = {}
    for g in groups:
        cells[(g.label, g.task, g.model_size)] = Cell(list(g.runs), [run_score(r, pick, data_source) for r in g.runs])
    return _row_labels(groups, paper_grid), sorted(columns, key=_column_order), cells


def _last_step(run: Run) -> int | None:
    return int(run.metrics.index.max()) if len(run.metrics) else None


def end_steps_note(rows: list[str], columns: list[tuple[str, str | None]],
                   cells: dict[tuple[str, str, str | None], Cell]) -> str | None:
    """A sentence naming each row's last logged step in every column whose runs end at different steps (they
    compare different amounts of training); None when every column's runs end together."""
    parts = []
    for task, size in columns:
        ends = {label: sorted({s for r in cells[(label, task, size)].runs if (s := _last_step(r)) is not None})
                for label in rows if (label, task, size) in cells}
        if len({s for steps in ends.values() for s in steps}) < 2:
            continue
        shown = [f"{label} at step {s[0]}" if len(s) == 1 else f"{label} at steps {s[0]}-{s[-1]}"
                 for label, s in ends.items() if s]
        parts.append(f"{_column_label(task, size)}: {', '.join(shown)}")
    if not parts:
        return None
    return "Rows end at different steps (their cells compare different amounts of training): " + "; ".join(parts) + "."


def _digits(task: str) -> int:
    return 2 if task in PERCENT_TASKS else 4


def format_cell(cell: Cell | None, task: str, pm: str = "±") -> str:
    """Text of one cell: the mean, ``± sd (n=...)`` over several seeds (a bare number is one run), or a marker
    when missing."""
    if cell is None:
        return NO_RUN
    vals = cell.values
    if not vals:
        return NO_VAL
    d = _digits(task)
    text = f"{cell.mean:.{d}f}"
    if len(vals) > 1:
        text += f" {pm} {statistics.stdev(vals):.{d}f} (n={len(vals)})"
    if len(vals) < len(cell.scores):
        text += f" [{len(cell.scores) - len(vals)} {NO_VAL}]"
    return text


def _column_label(task: str, size: str | None) -> str:
    return f"{TASK_LABELS.get(task, task)} {size or 'other size'}"


def paper_comparison(cells: dict[tuple[str, str, str | None], Cell],
                     tasks: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """Rows (task, metric, paper's figure, our best cell with its row label and size) for the tasks among ``tasks``
    (default: all) that have a recovered figure."""
    rows = []
    for task, (metric, value) in PAPER.items():
        if tasks is not None and task not in tasks:
            continue
        ours = [(c.mean, m, s) for (m, t, s), c in cells.items() if t == task and c.mean is not None]
        d = _digits(task)
        best = max(ours, key=lambda x: x[0]) if ours else None
        rows.append(
            (
                TASK_LABELS[task],
                metric,
                f"{value:.{d}f}",
                f"{best[0]:.{d}f} ({best[1]}, {best[2] or 'other size'})" if best else NO_RUN,
            )
        )
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rules = [":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    return "\n".join([line(header), "|" + "|".join(rules) + "|", *(line(r) for r in rows)])


def to_markdown(runs: list[Run], pick: str = "final", data_source: str | None = None, paper_grid: bool = False) -> str:
    """The results table and the paper comparison, in Markdown."""
    rows, columns, cells = build_cells(runs, pick, data_source, paper_grid)
    header = ["Method", *(_column_label(t, s) for t, s in columns)]
    body = [[label, *(format_cell(cells.get((label, t, s)), t) for t, s in columns)] for label in rows]
    text = (
        f"Validation score ({pick}); MATH and Countdown in %, HH reward-model score; mean ± sd over seeds (n), "
        f"a bare number is one run. {NO_RUN} no run, '{NO_VAL}' run without validation.\n\n"
        + markdown_table(header, body)
        + "\n"
    )
    ends = end_steps_note(rows, columns, cells)
    if ends:
        text += f"\n{ends}\n"
    paper = paper_comparison(cells, [t for t, _ in columns])
    if paper:
        text += ("\nPaper's recovered figures beside our best cell:\n\n"
                 + markdown_table(["Task", "Metric", "Paper", "Ours (best cell)"], [list(r) for r in paper]) + "\n")
    stats = statistics_rows(runs)
    if stats:
        text += (
            "\nTraining statistics at the last logged step (token means over the responses; mean ± sd over seeds). "
            "The reference statistics use the same fixed regions for every method; the regularizer's value is "
            "each method's own quantity and not comparable across methods.\n\n" + markdown_table(*stats) + "\n"
        )
    return text


# (column header, metric names tried in order, digits): quantities that mean the same for every method, then the
# regularizer's own value. Tail-mass and nucleus columns follow the reference regions the runs logged.
_FIXED_STATS = (
    ("Entropy (nats)", ("actor/ref/entropy_full", "actor/entropy_full"), 3),
    ("Top-1 probability", ("actor/ref/top1_prob",), 3),
)
_LAST_STATS = (
    ("Response length (tokens)", ("response_length/mean",), 1),
    ("Regularizer value (method-specific)", ("actor/regularizer/value", "actor/tre_value"), 3),
)
_TAIL = re.compile(r"^actor/ref/tail_mass_top(\d+)$")
_NUCLEUS = re.compile(r"^actor/ref/nucleus_size_p(.+)$")


def statistic_columns(runs: list[Run]) -> list[tuple[str, tuple[str, ...], int]]:
    """(header, metric names, digits) of the statistics table, for the reference regions present in ``runs``."""
    names = {c for r in runs for c in r.metrics.columns}
    tails = sorted((int(m[1]), n) for n in names if (m := _TAIL.match(n)))
    nuclei = sorted((float(m[1]), n) for n in names if (m := _NUCLEUS.match(n)))
    return [
        *_FIXED_STATS,
        *((f"Mass outside top {k}", (n,), 4) for k, n in tails),
        *((f"Nucleus size p={p:g} (tokens)", (n,), 1) for p, n in nuclei),
        *_LAST_STATS,
    ]


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return NO_RUN
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f} (n={len(values)})" if len(values) > 1 else "")


def statistics_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the training statistics at each run's last logged step, one row per seed group; None when
    no run logged any of them."""
    columns = statistic_columns(runs)
    groups = group_runs(runs)
    body = []
    for g in groups:
        cells = []
        for _, names, digits in columns:
            last = [float(s.iloc[-1]) for r in g.runs if (s := r.series(*names)) is not None]
            cells.append(_mean_sd([v for v in last if math.isfinite(v)], digits))
        body.append([f"{TASK_LABELS.get(g.task, g.task)} {g.model_size or 'other size'}", g.label, *cells])
    if all(c == NO_RUN for row in body for c in row[2:]):
        return None
    return ["Task", "Method", *(h for h, _, _ in columns)], body


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(runs: list[Run], pick: str = "final", data_source: str | None = None, paper_grid: bool = False) -> str:
    """A booktabs table: one header row of tasks spanning their sizes, one of sizes, the paper's row last (when a
    task of the table has a recovered figure); the note on differing end steps as a comment above it."""
    rows, columns, cells = build_cells(runs, pick, data_source, paper_grid)
    tasks = list(dict.fromkeys(t for t, _ in columns))
    spans = [sum(1 for t, _ in columns if t == task) for task in tasks]
    top = " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_latex_escape(TASK_LABELS.get(t, t))}}}" for t, n in zip(tasks, spans))
    rules, start = [], 2
    for n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    sizes = " & ".join(_latex_escape(s.upper() if s else "other size") for _, s in columns)
    ends = end_steps_note(rows, columns, cells)
    lines = [
        *([f"% {ends}"] if ends else []),
        r"\begin{tabular}{l" + "r" * len(columns) + "}",
        r"\toprule",
        rf"Method & {top} \\",
        " ".join(rules),
        rf" & {sizes} \\",
        r"\midrule",
    ]
    for label in rows:
        row = [format_cell(cells.get((label, t, s)), t, pm=r"$\pm$").replace(NO_RUN, "--") for t, s in columns]
        lines.append(_latex_escape(label) + " & " + " & ".join(row) + r" \\")
    if any(t in PAPER for t in tasks):
        # The paper's model size for these figures was not recovered: span the task's columns.
        paper = [
            rf"\multicolumn{{{n}}}{{c}}{{{PAPER[t][1]:.{_digits(t)}f}}}" if t in PAPER else rf"\multicolumn{{{n}}}{{c}}{{}}"
            for t, n in zip(tasks, spans)
        ]
        lines += [r"\midrule", r"Paper (best entry) & " + " & ".join(paper) + r" \\"]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m verl_tre.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="training run directories, or folders holding them")
    p.add_argument("--pick", choices=("final", "best"), default="final", help="last or best validation score (default final)")
    p.add_argument("--data-source", help="validation data source to report (substring); default: the task's main one")
    p.add_argument("--format", choices=("markdown", "latex"), default="markdown", help="what to print (default markdown)")
    p.add_argument("--paper-grid", action="store_true",
                   help="all six methods and the paper's six task x size columns, not only those that have runs")
    p.add_argument("--out-dir", help="also write table.md and table.tex there")
    args = p.parse_args(argv)
    runs = read_runs(args.run_dirs, report=print_note)
    md = to_markdown(runs, args.pick, args.data_source, args.paper_grid)
    tex = to_latex(runs, args.pick, args.data_source, args.paper_grid)
    print(md if args.format == "markdown" else tex)
    if args.out_dir:
        write_text(os.path.join(args.out_dir, "table.md"), md)
        write_text(os.path.join(args.out_dir, "table.tex"), tex)
        print(f"wrote {args.out_dir}/table.md and table.tex")
