"""The demo's report pieces (live lines, table, sentence, plot, summary), its output redirection, the metric names
it reads (against what the actor really logs), and one slow end-to-end invocation on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer_fixtures import REPO
from verl_tre import demo

M = demo.METRICS


def _records(rewards, tails, val):
    lines = [{"step": 0, "time": 0.0, "metrics": {M["held-out"]: val[0]}}]
    for i, (r, t) in enumerate(zip(rewards, tails), start=1):
        metrics = {M["reward"]: r, M["entropy"]: 0.5 + i, M["regularizer"]: 3.0, M["tail>top2"]: t,
                   M["resp_len"]: 9.0, M["seconds"]: 2.0 * i}
        if i == len(rewards):
            metrics[M["held-out"]] = val[1]
        lines.append({"step": i, "time": float(i), "metrics": metrics})
    return lines


def _write(run_dir: Path, records, truncated_tail: str = "") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + truncated_tail)


def test_records_lines_table_and_sentence(tmp_path):
    _write(tmp_path / "tre_k", _records([0.1, 0.3], [0.04, 0.03], [0.12, 0.25]), truncated_tail='{"step": 3, "ti')
    _write(tmp_path / "entropy", _records([0.1, 0.2], [0.04, 0.09], [0.12, 0.10]))
    records = {name: demo.read_records(tmp_path / name) for name in ("tre_k", "entropy")}
    assert [r["step"] for r in records["tre_k"]] == [0, 1, 2]  # the half-written line is skipped, not fatal

    line = demo.step_line("tre_k", records["tre_k"][2], steps=2)
    for text in ("step   2/2", "reward 0.300", "entropy 2.500", "regularizer  3.000", "tail>top2 0.030",
                 "len  9.0", "4.0 s", "held-out reward 0.250"):
        assert text in line, (text, line)
    assert "reward" not in demo.step_line("tre_k", records["tre_k"][0], 2).replace("held-out reward", "")

    stats = {name: demo.summarize(recs) for name, recs in records.items()}
    assert stats["tre_k"]["val_reward_start"] == 0.12 and stats["tre_k"]["val_reward_end"] == 0.25
    assert stats["entropy"]["tail>top2_last"] == 0.09 and stats["entropy"]["seconds_mean"] == 3.0
    table = demo.side_by_side(stats, n_val=256)
    assert "TRE-K (K=2)" in table and "Entropy bonus" in table and "(256 prompts)" in table
    after = next(row for row in table.splitlines() if row.startswith("held-out reward, after"))
    assert after.split()[-2:] == ["0.250", "0.100"]
    sentence = demo.conclusion(stats, 256, 0.01)
    assert "rose from 0.120 to 0.250" in sentence and "fell from 0.120 to 0.100" in sentence
    assert "rose from 0.040 to 0.090 under the entropy bonus" in sentence

    png = demo.plot(records, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


REDIRECT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from verl_tre import demo
    log = Path(sys.argv[1])
    with demo.output_to(log) as terminal:
        print("verl metric dump")
        print("worker warning", file=sys.stderr)
        terminal.write("live line\\n")
    print("after")
    """
)


def test_verl_output_goes_to_the_log_and_live_lines_to_the_terminal(tmp_path):
    log = tmp_path / "train.log"
    out = subprocess.run([sys.executable, "-c", REDIRECT, str(log)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["live line", "after"] and "warning" not in out.stderr
    assert log.read_text().split() == ["verl", "metric", "dump", "worker", "warning"]


ACTOR_METRICS = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    import test_actor as t
    import torch
    from omegaconf import OmegaConf
    setup = t.cpu_process_group.__wrapped__()
    next(setup)
    found = {}
    for name, override in (("tre_k", {"entropy_coeff": 0.01, "trust_region": {"mode": "top_k", "top_k": 2}}),
                           ("entropy", {"entropy_coeff": 0.01, "trust_region": {"mode": "full"}})):
        cfg = OmegaConf.merge(t.actor_config("ppo", True), OmegaConf.create(override))
        model = t.tiny_policy()
        actor = t.TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1))
        data = t.make_batch()
        data.batch["old_log_probs"] = actor.compute_log_prob(data)[0].float()
        found[name] = sorted(actor.update_policy(data))
    print(json.dumps(found))
    """
)


def test_demo_reads_metrics_the_actor_logs():
    """Every actor metric in demo.METRICS is one the actor logs, for TRE-K and for the entropy bonus."""
    # Not the parent's MASTER_PORT: a process group of an earlier test in this process may still hold it.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", ACTOR_METRICS], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    wanted = [name for name in M.values() if name.startswith("actor/")]
    assert len(wanted) == 3
    for run, names in found.items():
        assert set(wanted) <= set(names), (run, sorted(set(wanted) - set(names)))


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_settings(tmp_path, monkeypatch, capfd):
    """Both runs in one Ray session through verl's trainer, live lines, table, plot and summary.json."""
    monkeypatch.setattr(demo, "NUM_TRAIN", 64)
    monkeypatch.setattr(demo, "NUM_TEST", 16)
    monkeypatch.setattr(demo, "POLICY", dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64))
    monkeypatch.setattr(demo, "VOCAB_SIZE", 512)  # fewer merges: prompts over 48 tokens
    monkeypatch.setattr(demo, "TEST_FREQ", 2)  # held-out reward before training and after the last step only
    monkeypatch.setattr(demo, "PROMPTS", 4)
    monkeypatch.setattr(demo, "ROLLOUTS", 4)
    out = tmp_path / "demo"
    (out / "tre_k").mkdir(parents=True)
    (out / "tre_k" / "metrics.jsonl").write_text('{"step": 9, "time": 0, "metrics": {}}\n')  # a stale run
    demo.main(["--out", str(out), "--steps", "2", "--sft-steps", "2"])
    printed = capfd.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"train_seconds", "setup_seconds", "runs"} and summary["train_seconds"] > 0
    assert set(summary["runs"]) == {"tre_k", "entropy"}
    assert summary["runs"]["tre_k"]["method"] == "tre_k" and summary["runs"]["entropy"]["method"] == "entropy"
    for run in summary["runs"].values():
        assert run["n_val_prompts"] == 16 and 0 <= run["val_reward_start"] <= 1 and 0 <= run["val_reward_end"] <= 1
    for name in ("tre_k", "entropy"):
        steps = [r["step"] for r in demo.read_records(out / name)]
        assert steps == [0, 1, 2], steps  # started fresh: the stale step 9 is gone
        assert f"[{name:>7}] step   2/2" in printed
    assert (out / "demo.png").stat().st_size > 10_000
    assert "step:1 - " in (out / "train.log").read_text()  # verl's metric dumps went to the log ...
    assert "step:1 - " not in printed  # ... not to the terminal
    assert "From the same warm start, TRE-K's held-out reward (16 prompts)" in printed


def test_reuse_setup_keeps_only_a_matching_setup(tmp_path, monkeypatch):
    import argparse

    calls = []
    monkeypatch.setattr(demo, "prepare_data", lambda out: (calls.append("data"), (out / "data", []))[1])
    monkeypatch.setattr(demo, "build_tokenizer", lambda out, rows: calls.append("tok"))

    def fake_warm_start(out, tokenizer, rows, steps, seed):
        calls.append("sft")
        (out / "policy").mkdir(exist_ok=True)
        return out / "policy"

    monkeypatch.setattr(demo, "warm_start", fake_warm_start)
    out = tmp_path / "demo"
    args = argparse.Namespace(sft_steps=5, seed=0, reuse_setup=True)
    demo.set_up(out, args)
    (out / "policy" / "weights").write_text("w")
    (out / "entropy").mkdir()  # an earlier run's record
    demo.set_up(out, args)
    assert (out / "policy" / "weights").is_file() and not (out / "entropy").exists()
    demo.set_up(out, argparse.Namespace(sft_steps=6, seed=0, reuse_setup=True))  # other settings: redone
    assert not (out / "policy" / "weights").exists()
    demo.set_up(out, argparse.Namespace(sft_steps=6, seed=0, reuse_setup=False))  # default: fresh
    assert not (out / "policy" / "weights").exists() and calls.count("sft") == 4


def test_only_tagged_demonstrations_earn_reward():
    """The warm start's premise: the reward reads the answer tags, so an untagged demonstration of the same
    verified equation scores 0 (what RL can learn to fix in minutes) and a tagged one scores 1."""
    from verl_tre.utils.reward_score.countdown import compute_score

    truth = {"target": 46, "numbers": [12, 34]}
    assert compute_score(demo._response("12 + 34", tagged=True), truth) == 1.0
    assert compute_score(demo._response("12 + 34", tagged=False), truth) == 0.0
    assert 0 < demo.TAGGED_FRACTION < 1
