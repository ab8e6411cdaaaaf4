"""HH prompts (first user turn of trl-lib/ultrafeedback_binarized, shuffled with seed 42) as verl parquet.

    python experiments/hh/data_preprocess/hh.py --output-dir ~/data/hh
    python experiments/hh/data_preprocess/hh.py --input ultrafeedback.jsonl --num-train 100 --num-test 20

Local files hold one record per line with "chosen" (chat messages) or "prompt". Rows keep the prompt in
extra_info.prompt for the reward server client.
"""

import sys

from verl_tre.data.cli import base_parser, run
from verl_tre.data.hh_task import NUM_TEST, NUM_TRAIN, SHUFFLE_SEED, write_hh_splits


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "~/data/hh")
    parser.add_argument("--input", help="local records (JSONL or parquet) instead of the hub")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN, help="training prompts")
    parser.add_argument("--num-test", type=int, default=NUM_TEST, help="test prompts")
    parser.add_argument("--seed", type=int, default=SHUFFLE_SEED, help="shuffle seed")
    return run(
        parser,
        lambda a: write_hh_splits(
            a.output_dir,
            input_path=a.input,
            num_train=a.num_train,
            num_test=a.num_test,
            seed=a.seed,
            skip_bad_rows=a.skip_bad_rows,
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
