"""MATH (DigitalLearningGmbH/MATH-lighteval: 7.5k train, 5k test) as verl parquet.

    python experiments/math/data_preprocess/math_dataset.py --output-dir ~/data/math
    python experiments/math/data_preprocess/math_dataset.py --input train.jsonl --test-input test.jsonl

Local files hold one record per line with "problem" and "solution" (the answer is its last \\boxed{}),
or "problem" and "answer".
"""

import sys

from verl_tre.data.cli import base_parser, run
from verl_tre.data.math_task import write_math_splits


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "~/data/math")
    parser.add_argument("--input", help="local training records (JSONL or parquet) instead of the hub")
    parser.add_argument("--test-input", help="local test records (JSONL or parquet), required with --input")
    return run(
        parser,
        lambda a: write_math_splits(
            a.output_dir, train_input=a.input, test_input=a.test_input, skip_bad_rows=a.skip_bad_rows
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
