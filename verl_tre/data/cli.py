"""Argument parsing and error reporting shared by the data-preparation scripts under experiments/."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from verl_tre.data.rows import BadRowsError


def base_parser(description: str, default_output_dir: str) -> argparse.ArgumentParser:
    """A parser with the options every preparation script has: ``--output-dir`` and ``--skip-bad-rows``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default=default_output_dir, help="where train.parquet/test.parquet go")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed records instead of stopping at the first"
    )
    return parser


def run(
    parser: argparse.ArgumentParser, prepare: Callable[[argparse.Namespace], dict[str, Any]], argv: Sequence[str] | None
) -> int:
    """Parse ``argv``, call ``prepare``, print what was written; expected failures exit 1 with one clear line."""
    args = parser.parse_args(argv)
    try:
        result = prepare(args)
    except (BadRowsError, ValueError, FileNotFoundError, RuntimeError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    for split in ("train", "test"):
        if split in result:
            print(f"wrote {result[split]}")
    if result.get("skipped"):
        print(f"skipped {result['skipped']} malformed record(s)")
    return 0
