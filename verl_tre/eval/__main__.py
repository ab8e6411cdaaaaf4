"""``python -m verl_tre.eval INPUT``: evaluate n sampled responses per prompt.

INPUT is the parquet ``verl.trainer.main_generation`` writes (responses are scored with the task rewards),
or a run's validation dump (``trainer.validation_data_dir``, a ``<step>.jsonl`` or the directory; its
recorded scores are used). Prints a Markdown table per data source; ``--output`` writes the JSON report.
HH responses are scored by the reward server (``--reward-kwargs '{"hh_url": ...}'``): the evaluation first
waits for it to be ready, saying so, for up to ``hh_deadline`` seconds, and ends with one error line if it
stays down.
"""

from __future__ import annotations

import argparse
import sys
import json

from verl_tre.eval.evaluate import evaluate
from verl_tre.eval.files import write_text
from verl_tre.eval.metrics import default_ks
from verl_tre.eval.samples import load_samples, min_samples
from verl_tre.runs.tables import markdown_table


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated positive integers such as 1,4,8; got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be positive integers, got {text!r}")
    return ks


def format_report(report: dict[str, dict]) -> str:
    """The report as a Markdown table: one row per data source, metrics as columns (None shown as —)."""
    columns = list(dict.fromkeys(c for row in report.values() for c in row))

    def fmt(v: float | int | None) -> str:
        return "—" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"

    return markdown_table(["data source", *columns], [[ds, *(fmt(row.get(c)) for c in columns)] for ds, row in report.items()])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m verl_tre.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="main_generation parquet, or a validation dump (<step>.jsonl or its directory)")
    p.add_argument("--k", type=_parse_ks, help="k values for pass@k, avg@k, maj@k (default 1,2,4,...,n)")
    p.add_argument("--step", type=int, help="which validation dump of a dump directory (default the last)")
    p.add_argument("--data-source", help="name for validation-dump samples that record no data_source")
    p.add_argument(
        "--threshold", type=float,
        help="a sample counts as correct for pass@k when its score >= this (default: 0/1 rewards, 1 is correct)",
    )
    p.add_argument(
        "--reward-kwargs", type=json.loads, default={},
        help='options of the reward dispatcher as JSON, e.g. \'{"math_verify": true}\' or \'{"hh_url": "http://..."}\'',
    )
    p.add_argument("--output", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    groups = load_samples(args.input, step=args.step, data_source=args.data_source)
    n = min_samples(groups)
    ks = args.k or default_ks(n)
    if ks[-1] > n:
        p.error(f"--k {ks[-1]} exceeds the {n} samples the smallest prompt has; sample more (data.n_samples) or lower k")
    if not isinstance(args.reward_kwargs, dict):
        p.error(f"--reward-kwargs must be a JSON object, got {args.reward_kwargs!r}")
    report = evaluate(groups, ks, threshold=args.threshold, progress=not args.quiet, reward_kwargs=args.reward_kwargs)
    print(format_report(report))
    if args.output:
        write_text(args.output, json.dumps({"input": args.input, "ks": ks, "metrics": report}, indent=2) + "\n")
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    from verl_tre.utils.reward_score.hh import RewardServerError

    try:
        main()
    except (ValueError, FileNotFoundError, RewardServerError) as error:  # the message says what to fix
        sys.exit(f"error: {error}")
