"""Two-operand addition rows ("What is 7 + 12? Answer with just the number."), generated, for small real models.

Every ordered pair (a, b) with both operands in ``[min_operand, max_operand]`` is one instance; a seeded shuffle
splits them into disjoint train and test sets, so no held-out prompt is seen in training. The ground truth is
the sum; the reward (:mod:`verl_tre.utils.reward_score.arithmetic`) reads the last integer of the response.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from verl_tre.data import sources
from verl_tre.data.io import write_parquet_atomic
from verl_tre.data.rows import make_row


def arithmetic_row(a: int, b: int, split: str, index: int) -> dict:
    """A verl row asking for ``a + b``."""
    return make_row(sources.ARITHMETIC, sources.ARITHMETIC_TEMPLATE.format(a=a, b=b), "math",
                    {"answer": a + b, "operands": [a, b]}, split, index)


def write_arithmetic_splits(
    output_dir: str | os.PathLike, *, num_test: int, min_operand: int = 1, max_operand: int = 20, seed: int = 0
) -> dict[str, Path]:
    """Shuffle every ordered pair of operands in range with ``seed``; the first ``num_test`` go to
    ``test.parquet``, the rest to ``train.parquet`` under ``output_dir``. Returns the two paths."""
    if min_operand > max_operand:
        raise ValueError(f"need min_operand <= max_operand, got {min_operand} > {max_operand}")
    pairs = [(a, b) for a in range(min_operand, max_operand + 1) for b in range(min_operand, max_operand + 1)]
    if not 1 <= num_test < len(pairs):
        raise ValueError(f"operands in [{min_operand}, {max_operand}] give {len(pairs)} pairs: num_test must be in "
                         f"[1, {len(pairs) - 1}], got {num_test}")
    random.Random(seed).shuffle(pairs)
    splits = {"test": pairs[:num_test], "train": pairs[num_test:]}
    return {split: write_parquet_atomic([arithmetic_row(a, b, split, i) for i, (a, b) in enumerate(chosen)],
                                        Path(output_dir) / f"{split}.parquet")
            for split, chosen in splits.items()}
