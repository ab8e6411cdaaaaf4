"""Figure 1, panel A: what gradient ascent on the full entropy, on TRE-K and on TRE-P does to a next-token
distribution over a Qwen2.5-sized vocabulary.

``python figs/make_figure1.py`` writes figs/tre_diagram_panel_A.png and .pdf.

The distribution is LLM-like: a head of 12 plausible tokens holding 99.6 % of the mass and 151,924 implausible
tail tokens with log-normally spread logits. Each regularizer gets the same number of steps of the same length
in logit space (normalized gradient ascent), so the figure compares where each one moves mass, not how strong
its coefficient is (TRE's log V / log |T| factor makes its raw gradient ~17x larger at K = 2). The values and
gradients come from the project's own ``verl_tre.utils.torch_functional.entropy_from_logits``.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from verl_tre.eval.files import atomic_path  # noqa: E402
from verl_tre.utils.torch_functional import entropy_from_logits  # noqa: E402

VOCAB = 151_936  # Qwen2.5's padded vocabulary
HEAD_LOGITS = [3.0, 2.3, 1.2, 0.6, 0.1, -0.4, -0.9, -1.3, -1.7, -2.0, -2.4, -2.8]
TAIL_MEAN, TAIL_STD = -15.0, 1.5
METHODS = [  # (title, entropy_from_logits kwargs, colour)
    ("Full entropy", {}, "#d62728"),
    ("TRE-K (K = 2)", {"top_k": 2}, "#2ca02c"),
    ("TRE-P (p = 0.99)", {"top_p": 0.99}, "#17becf"),
]


def initial_logits(seed: int = 0) -> torch.Tensor:
    """[VOCAB] float64 logits: the head first (token ids 0..11 in rank order), then the tail."""
    g = torch.Generator().manual_seed(seed)
    head = torch.tensor(HEAD_LOGITS, dtype=torch.float64)
    tail = TAIL_MEAN + TAIL_STD * torch.randn(VOCAB - len(head), generator=g, dtype=torch.float64)
    return torch.cat([head, tail])


def tail_mass(z: torch.Tensor) -> float:
    """Probability outside the plausible head."""
    return torch.softmax(z, -1)[len(HEAD_LOGITS) :].sum().item()


def nucleus_size(z: torch.Tensor, p: float) -> int:
    """Size of the exact p-nucleus: tokens whose higher-ranked mass is below p."""
    probs = torch.softmax(z, -1).sort(descending=True).values
    return int(((probs.cumsum(0) - probs) < p).sum())


def ascend(z0: torch.Tensor, kwargs: dict, steps: int, step_size: float) -> tuple[torch.Tensor, list[float]]:
    """``steps`` normalized gradient-ascent steps of length ``step_size`` on the entropy; (final logits, tail mass
    after each step, the initial one first)."""
    z, tails = z0.clone(), [tail_mass(z0)]
    for _ in tqdm(range(steps), desc=str(kwargs or "full"), leave=False):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(entropy_from_logits(z[None], **kwargs).sum(), z)
        z = (z + step_size * grad / grad.norm()).detach()
        tails.append(tail_mass(z))
    return z, tails


def region_size(z: torch.Tensor, kwargs: dict) -> int:
    if "top_k" in kwargs:
        return kwargs["top_k"]
    if "top_p" in kwargs:
        return nucleus_size(z, kwargs["top_p"])
    return VOCAB


def draw(z0: torch.Tensor, results: list[tuple[torch.Tensor, list[float]]], steps: int, step_size: float) -> plt.Figure:
    n_head = len(HEAD_LOGITS)
    fig = plt.figure(figsize=(14, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.5, 1])
    x = list(range(n_head + 1))
    labels = [str(i + 1) for i in range(n_head)] + ["tail\n(151,924)"]

    def bars(z):
        p = torch.softmax(z, -1)
        return p[:n_head].tolist() + [p[n_head:].sum().item()]

    before = bars(z0)
    for col, ((title, kwargs, color), (z, _)) in enumerate(zip(METHODS, results)):
        ax = fig.add_subplot(grid[0, col])
        r0, r1 = region_size(z0, kwargs), region_size(z, kwargs)
        # Shade the trust region the first step used (token ids 0.. are in rank order at the start).
        right = n_head + 0.5 if r0 >= VOCAB else min(r0, n_head) - 0.5
        ax.axvspan(-0.5, right, color=color, alpha=0.08, lw=0)
        region_text = "whole vocabulary" if r0 >= VOCAB else f"{r0} tokens" + (f", {r1:,} after" if r1 != r0 else "")
        ax.bar(x, before, width=0.8, facecolor="none", edgecolor="0.35", lw=1.2, label="before")
        ax.bar(x, bars(z), width=0.5, color=color, alpha=0.85, label=f"after {steps} steps")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1.0)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("token (rank before)")
        ax.set_title(f"{title}\ntrust region (shaded): {region_text}", color=color, fontsize=11)
        t0, t1 = tail_mass(z0), tail_mass(z)
        ax.text(0.98, 0.97, f"tail mass {100 * t0:.2f}% → {100 * t1:.2f}%", transform=ax.transAxes,
                ha="right", va="top", fontsize=10, bbox={"facecolor": "white", "edgecolor": color, "alpha": 0.9})
        if col == 0:
            ax.set_ylabel("probability")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8, frameon=False)
    ax = fig.add_subplot(grid[1, :])
    for (title, _, color), (_, tails) in zip(METHODS, results):
        ax.plot(range(len(tails)), [100 * t for t in tails], color=color, label=title, lw=2)
    ax.set_xlabel(f"gradient-ascent step (normalized, length {step_size} in logit space)")
    ax.set_ylabel("tail mass (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"Entropy ascent on an LLM-like next-token distribution (V = {VOCAB:,}): where does the mass go?")
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="gradient-ascent steps per regularizer (default 20)")
    p.add_argument("--step-size", type=float, default=0.25, help="length of each step in logit space (default 0.25)")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output directory (default figs/)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.step_size <= 0:
        p.error("--steps must be >= 1 and --step-size > 0")
    z0 = initial_logits()
    results = [ascend(z0, kwargs, args.steps, args.step_size) for _, kwargs, _ in METHODS]
    fig = draw(z0, results, args.steps, args.step_size)
    for ext in ("png", "pdf"):
        path = os.path.join(args.out, f"tre_diagram_panel_A.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        print(path)
    for (title, _, _), (_, tails) in zip(METHODS, results):
        print(f"{title}: tail mass {100 * tails[0]:.3f}% -> {100 * tails[-1]:.3f}%")


if __name__ == "__main__":
    main()
