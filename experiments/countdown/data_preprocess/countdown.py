"""Countdown (3-4 numbers) as verl parquet: the reference's hub data, a local file, or generated instances.

    python experiments/countdown/data_preprocess/countdown.py --output-dir ~/data/countdown
    python experiments/countdown/data_preprocess/countdown.py --source generate --num-train 7500 \\
        --num-test 5000 --seed 0 --output-dir ~/data/countdown

The hub source is Jiayi-Pan/Countdown-Tasks-3to4-Unique (first N records train, next M test); local files
hold one record per line with "target" and "nums". "generate" needs no network: unique solvable instances,
each with a verified solution in extra_info.solution.
"""

import sys

from verl_tre.data.cli import base_parser, run
from verl_tre.data.countdown_task import NUM_TEST, NUM_TRAIN, write_countdown_from_records, write_countdown_splits


def _prepare(args):
    if args.source == "generate":
        if args.input:
            raise ValueError("--input reads records; it cannot be combined with --source generate")
        return write_countdown_splits(
            args.output_dir,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            num_numbers=args.num_numbers,
            min_number=args.min_number,
            max_number=args.max_number,
            min_target=args.min_target,
            max_target=args.max_target,
        )
    return write_countdown_from_records(
        args.output_dir,
        input_path=args.input,
        num_train=args.num_train,
        num_test=args.num_test,
        skip_bad_rows=args.skip_bad_rows,
    )


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "~/data/countdown")
    parser.add_argument("--source", choices=("hub", "generate"), default="hub", help="where instances come from")
    parser.add_argument("--input", help="local records (JSONL or parquet) instead of the hub")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN, help="training instances")
    parser.add_argument("--num-test", type=int, default=NUM_TEST, help="test instances")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--num-numbers", type=int, nargs="+", default=[3, 4], help="generate: numbers per instance")
    parser.add_argument("--min-number", type=int, default=1, help="generate: smallest number")
    parser.add_argument("--max-number", type=int, default=100, help="generate: largest number")
    parser.add_argument("--min-target", type=int, default=1, help="generate: smallest target")
    parser.add_argument("--max-target", type=int, default=100, help="generate: largest target")
    return run(parser, _prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
