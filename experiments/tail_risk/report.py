"""Summary table, plots and a conclusion written from the numbers of a results directory.

Differences between two variants are tested with an exact two-sided permutation test on the seed means (no
distributional assumption; with n seeds per side the smallest reachable p is 2 / C(2n, n), 0.029 for n = 4).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: no display on CI machines)

from .study import LABELS, VARIANTS, write_json  # noqa: E402

ALPHA = 0.05
CURVES = (("invalid_mass", "never-valid mass / token"), ("entropy_full", "full entropy (nats)"),
          ("tre_k", "TRE-K value (scaled)"), ("tre_p", "TRE-P value (scaled)"))


def load_runs(results: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    if not runs:
        raise ValueError(f"no finished runs under {results / 'runs'}; run the study first")
    return runs


def _cells(runs):
    return sorted({(r["vocab_size"], r["horizon"]) for r in runs}, key=lambda c: (c[0], c[1] != "short"))


def _variants(runs):
    present = {r["variant"] for r in runs}
    return [v for v in VARIANTS if v in present]


def _values(runs, cell, variant, key) -> list[float]:
    return [r["final"][key] if key in r["final"] else r["history"][-1][key]
            for r in runs if (r["vocab_size"], r["horizon"]) == cell and r["variant"] == variant]


def permutation_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact permutation p-value of mean(a) - mean(b) (1.0 when either side has fewer than 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return 1.0
    pooled, n = a + b, len(a)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    splits = list(itertools.combinations(range(len(pooled)), n))
    hits = 0
    for chosen in splits:
        inside = [pooled[i] for i in chosen]
        outside = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += abs(statistics.fmean(inside) - statistics.fmean(outside)) >= observed - 1e-12
    return hits / len(splits)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(runs: list[dict], results: Path) -> str:
    """Markdown table: mean ± sd across seeds per (V, horizon, variant), with the warm start of each cell."""
    head = ("| V | horizon | variant | acc T=1 (%) | acc greedy (%) | never-valid mass / token (1e-3) | "
            "responses with never-valid token (%) | collapsed | full entropy (nats) | TRE-K* | TRE-P* |")
    lines = [head, "|" + "---|" * 11]
    for cell in _cells(runs):
        vocab, horizon = cell
        warm = json.loads((results / "sft" / f"{horizon}.json").read_text())["eval"][str(vocab)]
        lines.append(f"| {vocab} | {horizon} | warm start | {100 * warm['acc_sampled']:.1f} | {100 * warm['acc_greedy']:.1f} | "
                     f"{1e3 * warm['invalid_mass']:.3f} | {100 * warm['invalid_response']:.1f} | - | {warm['entropy_full']:.2f} | - | - |")
        for var in _variants(runs):
            got = lambda key: _values(runs, cell, var, key)  # noqa: E731
            collapsed = [r["collapsed"] for r in runs if (r["vocab_size"], r["horizon"]) == cell and r["variant"] == var]
            lines.append(
                f"| {vocab} | {horizon} | {LABELS[var]} | {_fmt(got('acc_sampled'), 100, 1)} | {_fmt(got('acc_greedy'), 100, 1)} | "
                f"{_fmt(got('invalid_mass'), 1e3, 3)} | {_fmt(got('invalid_response'), 100, 1)} | {sum(collapsed)}/{len(collapsed)} | "
                f"{_fmt(got('entropy_full'))} | {_fmt(got('tre_k'))} | {_fmt(got('tre_p'))} |"
            )
    lines.append("")
    n_test = json.loads((results / "study.json").read_text())["n_test"]
    lines.append(f"Mean ± sd across seeds of held-out readouts after RL ({n_test} prompts, one sampled and one greedy "
                 "response each); * scaled TRE values on the last training batch, logged for every variant.")
    return "\n".join(lines)


def _curve(runs, cell, variant, key):
    """(steps, mean, lo, hi) across seeds of a logged history key."""
    group = [r["history"] for r in runs if (r["vocab_size"], r["horizon"]) == cell and r["variant"] == variant]
    steps = [rec["step"] for rec in group[0] if key in rec]
    series = [[rec[key] for rec in hist if key in rec] for hist in group]
    cols = list(zip(*series))
    return steps, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_curves(runs: list[dict], path: Path) -> None:
    """Rows: logged quantities; columns: (V, horizon) cells; one line per variant (mean, band = min..max)."""
    cells, variants = _cells(runs), _variants(runs)
    fig, axes = plt.subplots(len(CURVES), len(cells), figsize=(4.2 * len(cells), 3.0 * len(CURVES)), squeeze=False)
    for col, cell in enumerate(cells):
        for row, (key, label) in enumerate(CURVES):
            ax = axes[row][col]
            for i, var in enumerate(variants):
                steps, mean, lo, hi = _curve(runs, cell, var, key)
                ax.plot(steps, mean, color=f"C{i}", label=LABELS[var])
                ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15)
            if key == "invalid_mass":
                ax.set_yscale("log")
            ax.set_title(f"V={cell[0]}, {cell[1]} horizon", fontsize=9)
            ax.set_xlabel("GRPO step")
            ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(runs: list[dict], results: Path, path: Path) -> None:
    """Final held-out accuracy per seed (dots) and mean (bar), warm start dashed; rows: sampled, greedy."""
    cells, variants = _cells(runs), _variants(runs)
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.5), squeeze=False)
    for col, cell in enumerate(cells):
        warm = json.loads((results / "sft" / f"{cell[1]}.json").read_text())["eval"][str(cell[0])]
        for row, key in enumerate(("acc_sampled", "acc_greedy")):
            ax = axes[row][col]
            for i, var in enumerate(variants):
                vals = _values(runs, cell, var, key)
                ax.bar(i, statistics.fmean(vals), color=f"C{i}", alpha=0.4)
                ax.scatter([i] * len(vals), vals, color=f"C{i}", s=12)
            ax.axhline(warm[key], color="k", linestyle="--", linewidth=1, label="warm start")
            ax.set_xticks(range(len(variants)), [LABELS[v].replace(", ", "\n") for v in variants], fontsize=6, rotation=45)
            ax.set_title(f"V={cell[0]}, {cell[1]}: {'sampled T=1' if row == 0 else 'greedy'}", fontsize=9)
            ax.set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _compare(runs, cell, a, b, key):
    va, vb = _values(runs, cell, a, key), _values(runs, cell, b, key)
    return statistics.fmean(va), statistics.fmean(vb), permutation_p(va, vb)


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.1f}x" if y > 0 else "from zero"


def conclusion(runs: list[dict]) -> str:
    """Paragraphs generated from the numbers: tail leak, strength and collapse, accuracy, what the noise allows."""
    cells, variants = _cells(runs), _variants(runs)
    n_seeds = min(len(_values(runs, c, v, "acc_sampled")) for c in cells for v in variants)
    tests = 0
    out = []

    if "full" in variants and "none" in variants:
        leak, no_leak = [], []
        for cell in cells:
            full, none, p = _compare(runs, cell, "full", "none", "invalid_mass")
            tests += 1
            text = f"V={cell[0]}/{cell[1]}: {1e3 * none:.3f} -> {1e3 * full:.3f} x1e-3 ({_ratio(full, none)}, p={p:.3f})"
            (leak if p < ALPHA and full > none else no_leak).append(text)
        para = "**Tail leak.** Against no entropy bonus, the full-entropy bonus "
        para += ("raised the never-valid probability per token clearly in " + "; ".join(leak) + ". ") if leak else \
            "did not raise the never-valid probability per token beyond the seed noise in any cell. "
        if no_leak:
            para += "Not resolved from noise: " + "; ".join(no_leak) + ". "
        tre = [v for v in variants if v.startswith("tre")]
        below_full, above_none, pairs = [], [], 0
        for cell in cells:
            for var in tre:
                pairs += 1
                t, f, p = _compare(runs, cell, var, "full", "invalid_mass")
                _, n, q = _compare(runs, cell, var, "none", "invalid_mass")
                tests += 2
                name = f"{LABELS[var]} at V={cell[0]}/{cell[1]}"
                if p < ALPHA and t < f:
                    below_full.append(name)
                if q < ALPHA and t > n:
                    above_none.append(f"{name} ({_ratio(t, n)})")
        para += f"TRE kept the tail clearly below full entropy in {len(below_full)} of {pairs} (variant, cell) pairs"
        para += f" ({', '.join(below_full)}). " if 0 < len(below_full) <= pairs // 2 else ". "
        para += (f"TRE raised it clearly above no entropy in {len(above_none)} of {pairs}: " + "; ".join(above_none) + ". "
                 if above_none else "No TRE variant raised it clearly above no entropy. ")
        by_v = {}
        for cell in cells:
            by_v.setdefault(cell[1], {})[cell[0]] = statistics.fmean(_values(runs, cell, "full", "invalid_response"))
        growth = [f"{h}: " + ", ".join(f"V={v} {100 * x:.1f}%" for v, x in sorted(d.items())) for h, d in by_v.items()]
        para += "Share of held-out full-entropy responses holding a never-valid token: " + "; ".join(growth) + "."
        out.append(para)

    if "full" in variants and "none" in variants:
        parts = []
        for cell in cells:
            base = statistics.fmean(_values(runs, cell, "none", "entropy_full"))
            shifts = []
            for var in variants:
                if var == "none":
                    continue
                rise = statistics.fmean(_values(runs, cell, var, "entropy_full")) - base
                collapsed = sum(r["collapsed"] for r in runs if (r["vocab_size"], r["horizon"]) == cell and r["variant"] == var)
                shifts.append(f"{LABELS[var]} {rise:+.2f}" + (f" ({collapsed} collapsed)" if collapsed else ""))
            parts.append(f"V={cell[0]}/{cell[1]}: " + ", ".join(shifts))
        total = {v: sum(r["collapsed"] for r in runs if r["variant"] == v) for v in variants}
        n_runs = {v: sum(1 for r in runs if r["variant"] == v) for v in variants}
        para = ("**Strength and collapse.** Change of the held-out full entropy against no bonus (nats) at one "
                "coefficient: " + "; ".join(parts) + ". Collapsed runs per variant (all cells): "
                + ", ".join(f"{LABELS[v]} {total[v]}/{n_runs[v]}" for v in variants) + ".")
        out.append(para)

    if "none" in variants:
        better, worse, biggest = [], [], (0.0, None)
        for cell in cells:
            for var in variants:
                if var == "none":
                    continue
                for key, name in (("acc_sampled", "sampled"), ("acc_greedy", "greedy")):
                    a, b, p = _compare(runs, cell, var, "none", key)
                    tests += 1
                    if abs(a - b) > abs(biggest[0]):
                        biggest = (a - b, f"{LABELS[var]} at V={cell[0]}/{cell[1]} ({name}, p={p:.3f})")
                    if p < ALPHA:
                        (better if a > b else worse).append(f"{LABELS[var]} at V={cell[0]}/{cell[1]} ({name}, "
                                                            f"{100 * b:.1f}% -> {100 * a:.1f}%, p={p:.3f})")
        para = "**Accuracy.** "
        para += ("Clearly above no entropy: " + "; ".join(better) + ". ") if better else \
            "No regularized variant beat no entropy on held-out accuracy beyond the seed noise. "
        if worse:
            para += "Clearly below: " + "; ".join(worse) + ". "
        if biggest[1]:
            para += f"Largest difference from no entropy: {100 * biggest[0]:+.1f} points, {biggest[1]}."
        out.append(para)

    min_p = 2 / math.comb(2 * n_seeds, n_seeds) if n_seeds >= 2 else 1.0
    out.append(
        f"**What the noise allows.** {n_seeds} seeds per configuration, exact permutation tests at p < {ALPHA} "
        f"(smallest reachable p = {min_p:.3f}); {tests} comparisons were made, so about {ALPHA * tests:.1f} "
        "of them would pass by chance alone: a single borderline result is not a finding, a pattern across cells is. "
        "The seeds vary the RL sampling only; every variant of a cell starts from the same warm start."
    )
    return "\n\n".join(out)


def write_report(results: Path) -> Path:
    """Writes summary.md (table + conclusion), curves.png, accuracy.png and summary.json under ``results``."""
    runs = load_runs(results)
    plot_curves(runs, results / "curves.png")
    plot_accuracy(runs, results, results / "accuracy.png")
    text = "\n\n".join([table(runs, results), conclusion(runs)]) + "\n"
    path = results / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    seconds = sum(r["seconds"] for r in runs)
    write_json(results / "summary.json", {"runs": len(runs), "rl_cpu_seconds": seconds})
    return path
