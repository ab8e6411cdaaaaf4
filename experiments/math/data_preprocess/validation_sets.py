"""MATH500 and AIME validation sets as verl parquet (OUTPUT_DIR/test.parquet), scored like MATH.

    python experiments/math/data_preprocess/validation_sets.py --set math500 --output-dir ~/data/math500
    python experiments/math/data_preprocess/validation_sets.py --set aime2024 --input aime.jsonl

Local files hold one record per line with "problem" and "answer" (or a "solution" with a \\boxed{} answer).
"""

import sys

from verl_tre.data.cli import base_parser, run
from verl_tre.data.math_task import VALIDATION_SETS, write_validation_set


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "~/data/<set>")
    parser.add_argument("--set", required=True, choices=sorted(VALIDATION_SETS), help="which validation set")
    parser.add_argument("--input", help="local records (JSONL or parquet) instead of the hub")
    return run(
        parser,
        lambda a: write_validation_set(
            a.set,
            a.output_dir.replace("<set>", a.set),
            input_path=a.input,
            skip_bad_rows=a.skip_bad_rows,
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
