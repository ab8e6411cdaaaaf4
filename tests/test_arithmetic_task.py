"""Two-operand arithmetic: disjoint generated splits in verl's row format, and the last-integer reward."""

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tre.data import sources
from verl_tre.data.arithmetic_task import write_arithmetic_splits
from verl_tre.utils.reward_score import compute_score
from verl_tre.utils.reward_score.arithmetic import last_integer


def test_splits_are_disjoint_cover_every_pair_and_are_seeded(tmp_path):
    paths = write_arithmetic_splits(tmp_path / "a", num_test=30, min_operand=1, max_operand=9, seed=3)
    train, test = (pd.read_parquet(paths[s]) for s in ("train", "test"))
    pairs = lambda df: [tuple(int(v) for v in r["operands"]) for r in df["reward_model"].map(lambda m: m["ground_truth"])]
    assert len(test) == 30 and len(train) == 81 - 30
    assert set(pairs(train)).isdisjoint(pairs(test))
    assert set(pairs(train)) | set(pairs(test)) == {(a, b) for a in range(1, 10) for b in range(1, 10)}
    row = test.iloc[0]
    a, b = (int(v) for v in row["reward_model"]["ground_truth"]["operands"])
    assert row["data_source"] == sources.ARITHMETIC
    assert list(row["prompt"]) == [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]
    assert row["reward_model"]["ground_truth"]["answer"] == a + b
    again = write_arithmetic_splits(tmp_path / "b", num_test=30, min_operand=1, max_operand=9, seed=3)
    assert pairs(pd.read_parquet(again["test"])) == pairs(test)
    other = write_arithmetic_splits(tmp_path / "c", num_test=30, min_operand=1, max_operand=9, seed=4)
    assert pairs(pd.read_parquet(other["test"])) != pairs(test)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_test=0), "num_test must be in"), (dict(num_test=81), "num_test must be in"),
    (dict(num_test=5, min_operand=5, max_operand=4), "min_operand <= max_operand"),
])
def test_bad_split_settings_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_arithmetic_splits(tmp_path, **{"max_operand": 9, **kwargs})


@pytest.mark.parametrize("response, score", [
    ("12", 1.0), ("7 + 5 = 12", 1.0), ("The answer is 12.", 1.0), ("12<|im_end|>", 1.0),
    ("12 is not right, it is 13", 0.0), ("7 + 5", 0.0), ("", 0.0), ("twelve", 0.0), ("-12", 0.0),
    ("1,012 minus 1,000 is 12", 1.0), ("x=1,2", 0.0), ("112", 0.0),
])
def test_reward_reads_the_last_integer(response, score):
    truth = {"answer": 12, "operands": [7, 5]}
    assert compute_score(sources.ARITHMETIC, response, truth) == score


def test_batch_manager_routes_arithmetic():
    scores = compute_score(data_sources=[sources.ARITHMETIC] * 2, solution_strs=["3", "4"],
                           ground_truths=[{"answer": 3}, {"answer": 3}])
    assert scores == [1.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-10**12, max_value=10**12), st.text(alphabet="ab .=+\n", max_size=20))
def test_last_integer_finds_any_integer_after_any_text(n, prefix):
    assert last_integer(f"{prefix} {n}") == n
