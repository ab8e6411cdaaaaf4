"""Evaluation: pass@k against brute-force enumeration, maj@k and avg@k by hand, both input formats."""

import itertools
import json
import os
from fractions import Fraction
from types import SimpleNamespace

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tre.eval import avg_at_k, default_ks, evaluate, load_samples, maj_at_k, pass_at_k
from verl_tre.eval import metrics as metrics_mod
from verl_tre.eval.__main__ import main as eval_main
from verl_tre.eval.answers import fallback_extract, last_boxed


def brute_pass_at_k(correct: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return Fraction(sum(any(correct[i] for i in s) for s in subsets), len(subsets))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12), st.data())
def test_pass_at_k_equals_enumeration_over_all_k_subsets(correct, data):
    k = data.draw(st.integers(1, len(correct)))
    expected = brute_pass_at_k(correct, k)
    assert pass_at_k(len(correct), sum(correct), k) == pytest.approx(float(expected), abs=1e-15)


def test_pass_at_k_large_n_stays_exact():
    # The float-product form drifts here; C(n-c,k)/C(n,k) with n=1000, c=1, k=500 is exactly 1/2.
    assert pass_at_k(1000, 1, 500) == 0.5
    assert pass_at_k(1000, 0, 1000) == 0.0 and pass_at_k(1000, 1000, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="k|c="):
        pass_at_k(n, c, k)


def test_maj_at_k_by_hand_with_ties_and_abstentions():
    answers, scores = ["a", "a", "b"], [1.0, 1.0, 0.0]
    assert maj_at_k(answers, scores, 3) == 1.0
    assert maj_at_k(answers, scores, 1) == pytest.approx(2 / 3)
    # k=2: {a,a} -> 1, {a,b} tie -> 0.5, {a,b} tie -> 0.5
    assert maj_at_k(answers, scores, 2) == pytest.approx(2 / 3)
    # Abstaining samples do not vote; a subset where nobody answers scores 0.
    assert maj_at_k([None, "b", None], [0.0, 1.0, 0.0], 3) == 1.0
    assert maj_at_k([None, "b", None], [0.0, 1.0, 0.0], 1) == pytest.approx(1 / 3)


def test_maj_at_k_sampling_matches_exact_enumeration(monkeypatch):
    answers = list("aabbbcaabcdd") + ["a", None, "b", "e"]
    scores = [1.0 if a == "a" else 0.0 for a in answers]
    k = 8  # C(16, 8) = 12,870 subsets: above the exact limit
    sampled = maj_at_k(answers, scores, k)
    assert maj_at_k(answers, scores, k, seed=0) == sampled  # seeded: reproducible
    monkeypatch.setattr(metrics_mod, "MAJ_EXACT_LIMIT", 10**6)
    exact = maj_at_k(answers, scores, k)
    assert abs(sampled - exact) < 0.02


def test_avg_at_k_uses_the_first_k_samples_and_default_ks():
    assert avg_at_k([1, 0, 0, 1], 2) == 0.5 and avg_at_k([1, 0, 0, 1], 4) == 0.5 and avg_at_k([1, 0, 0, 1], 1) == 1
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


def test_answer_extraction_fallback():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert fallback_extract("countdown", "<think>x</think> <answer> (1 + 2) / 3 </answer>") == "(1+2)/3"
    assert fallback_extract("hh", "no answer here") is None


def boxed_scorer(data_source, solution_str, ground_truth, extra_info=None):
    """A toy MATH-like reward: 1 when the last boxed answer equals the ground truth."""
    return float(last_boxed(solution_str) == ground_truth)


def write_generation_parquet(path, rows):
    """What verl.trainer.main_generation writes: the dataset columns plus 'responses' (n strings per row)."""
    df = pd.DataFrame(
        {
            "data_source": [r[0] for r in rows],
            "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(len(rows))],
            "reward_model": [{"style": "rule", "ground_truth": r[1]} for r in rows],
            "extra_info": [{"split": "test", "index": i} for i in range(len(rows))],
            "responses": [r[2] for r in rows],
        }
    )
    df.to_parquet(path)


def test_evaluate_generation_parquet_with_an_injected_scorer(tmp_path):
    b = lambda x: rf"so \boxed{{{x}}}"  # noqa: E731
    rows = [
        ("mathA", "1", [b(1), b(2), b(2), b(1)]),
        ("mathA", "5", [b(3), b(3), b(3), b(5)]),
        ("mathB", "7", [b(7), b(7), "no box", b(0)]),
    ]
    path = tmp_path / "gen.parquet"
    write_generation_parquet(path, rows)
    groups = load_samples(str(path))
    report = evaluate(groups, [1, 2, 4], scorer=boxed_scorer, progress=False)
    assert set(report) == {"mathA", "mathB"}
    # Expectations from brute force over the same responses.
    for ds in report:
        mine = [r for r in rows if r[0] == ds]
        correct = [[last_boxed(x) == gt for x in resp] for _, gt, resp in mine]
        for k in (1, 2, 4):
            want = sum(float(brute_pass_at_k(c, k)) for c in correct) / len(correct)
            assert report[ds][f"pass@{k}"] == pytest.approx(want)
        assert report[ds]["mean_reward"] == pytest.approx(sum(map(sum, correct)) / (4 * len(correct)))
        assert report[ds]["prompts"] == len(mine) and report[ds]["samples"] == 4
    # maj@4: mathA prompt 1 ties 1 vs 2 -> 0.5, prompt 2 votes 3 -> 0; mathB votes 7 -> 1.
    assert report["mathA"]["maj@4"] == pytest.approx(0.25)
    assert report["mathB"]["maj@4"] == 1.0
    assert report["mathA"]["avg@2"] == pytest.approx((0.5 + 0.0) / 2)


def test_non_binary_rewards_report_no_pass_at_k_unless_a_threshold_is_given(tmp_path):
    path = tmp_path / "gen.parquet"
    write_generation_parquet(path, [("hh", "", ["short", "a longer answer"]), ("hh", "", ["x", "yy"])])
    length_reward = lambda ds, s, gt, extra=None: {"score": len(s) / 4.0}  # noqa: E731
    report = evaluate(load_samples(str(path)), [1, 2], scorer=length_reward, progress=False)["hh"]
    assert report["pass@1"] is None and report["maj@2"] is None
    assert report["mean_reward"] == pytest.approx((5 / 4 + 15 / 4 + 1 / 4 + 2 / 4) / 4)
    report = evaluate(load_samples(str(path)), [1, 2], scorer=length_reward, threshold=1.0, progress=False)["hh"]
    assert report["pass@1"] == pytest.approx((1.0 + 0.0) / 2) and report["pass@2"] == pytest.approx(0.5)


def test_k_above_n_fails_before_any_scoring(tmp_path):
    path = tmp_path / "gen.parquet"
    write_generation_parquet(path, [("m", "1", ["a", "b"])])

    def exploding_scorer(*args):
        raise AssertionError("scored although k was invalid")

    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        evaluate(load_samples(str(path)), [4], scorer=exploding_scorer, progress=False)


def test_generation_parquet_missing_columns_is_named(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"data_source": ["m"], "responses": [["a"]]}).to_parquet(path)
    with pytest.raises(ValueError, match="reward_model"):
        load_samples(str(path))


def write_validation_dumps(directory, steps):
    """Dumps written by verl's own RayPPOTrainer._dump_generations, as a run with validation_data_dir does."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    for step, (inputs, outputs, scores, extra) in steps.items():
        RayPPOTrainer._dump_generations(SimpleNamespace(global_steps=step), inputs, outputs, scores, extra, str(directory))


def test_validation_dump_through_the_command_line(tmp_path, capsys):
    dump = tmp_path / "val"
    # Two prompts x 3 samples, interleaved as verl repeats them; 'acc' and 'pred' from a dict-returning reward.
    inputs = ["p1"] * 3 + ["p2"] * 3
    outputs = [r"\boxed{1}", r"\boxed{1}", r"\boxed{2}", "<answer>3</answer>", "<answer>4</answer>", "none"]
    scores = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    extra = {"reward": scores, "acc": [s == 1.0 for s in scores]}
    write_validation_dumps(dump, {2: (inputs, outputs, [0.0] * 6, {}), 4: (inputs, outputs, scores, extra)})
    with open(dump / "4.jsonl", "a") as f:
        f.write('{"input": "p3", "outp')  # a run killed mid-write
    out = tmp_path / "report.json"
    report = eval_main([str(dump), "--data-source", "math", "--output", str(out), "--quiet"])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == report and saved["ks"] == [1, 2, 3]
    m = report["math"]
    assert m["prompts"] == 2 and m["samples"] == 3
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["pass@3"] == 1.0
    assert m["maj@3"] == pytest.approx((1.0 + 0.5) / 2)  # p2: answers 3 and 4 tie, 'none' abstains
    assert "| math" in capsys.readouterr().out
    # --step picks an older dump, whose recorded scores are all 0.
    assert eval_main([str(dump), "--step", "2", "--quiet"])["validation"]["pass@3"] == 0.0


def test_command_line_rejects_bad_k_and_missing_step(tmp_path, capsys):
    dump = tmp_path / "val"
    write_validation_dumps(dump, {1: (["p"] * 2, ["a", "b"], [1.0, 0.0], {})})
    with pytest.raises(SystemExit):
        eval_main([str(dump), "--k", "1,5"])
    assert "exceeds the 2 samples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="available steps: \\[1\\]"):
        eval_main([str(dump), "--step", "9"])
    with pytest.raises(FileNotFoundError):
        eval_main([os.path.join(tmp_path, "nope.parquet")])


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "eval", "generate_and_eval.sh")


def run_script(*args, **env):
    import subprocess

    full_env = {**os.environ, "DRY_RUN": "1", "N_GPUS": "2", **env}
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=30)


def test_wrapper_merges_fsdp_shards_and_samples_with_the_papers_validation_settings(tmp_path):
    actor = tmp_path / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_2_rank_0.pt").touch()
    data = tmp_path / "test.parquet"
    data.touch()
    res = run_script(tmp_path / "global_step_3", data, tmp_path / "out", "rollout.name=hf", KS="1,4")
    assert res.returncode == 0, res.stderr
    cmds = [ln[2:] for ln in res.stderr.splitlines() if ln.startswith("+ ")]
    assert f"--local_dir {actor} --target_dir {tmp_path}/out/hf_model" in cmds[0]
    gen = cmds[2].split()
    assert gen[:3] == ["python", "-m", "verl.trainer.main_generation"]
    # Ray is told of 10 CPUs per GPU worker and one for the driver task, however few the machine has.
    ray_cpus = max(len(os.sched_getaffinity(0)), 21)
    for override in ("rollout.temperature=1.0", "rollout.top_p=0.7", "data.n_samples=8", f"model.path={tmp_path}/out/hf_model",
                     "trainer.n_gpus_per_node=2", "rollout.name=hf", f"ray_init.num_cpus={ray_cpus}"):
        assert override in gen
    assert cmds[3].endswith(f"verl_tre.eval {tmp_path}/out/generations.parquet --output {tmp_path}/out/eval.json --k 1,4")
    # A Hugging Face directory is used as it is.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    res = run_script(tmp_path / "hf", data, tmp_path / "out2", N_SAMPLES="4")
    assert "model_merger" not in res.stderr and f"model.path={tmp_path}/hf" in res.stderr and "data.n_samples=4" in res.stderr


@pytest.mark.parametrize(
    "ckpt,data,env,message",
    [
        ("missing", "data", {}, "does not exist"),
        ("empty", "data", {}, "neither a Hugging Face model"),
        ("empty", "nodata", {}, "data file"),
        ("empty", "data", {"N_SAMPLES": "0"}, "N_SAMPLES"),
    ],
)
def test_wrapper_rejects_bad_inputs_with_a_message(tmp_path, ckpt, data, env, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data").touch()
    res = run_script(tmp_path / ckpt, tmp_path / data, tmp_path / "out", **env)
    assert res.returncode == 2 and message in res.stderr


def test_wrapper_without_a_gpu_stops_with_one_line_instead_of_waiting(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "data").touch()
    fake = tmp_path / "bin" / "nvidia-smi"  # a machine whose nvidia-smi lists no GPU
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("N_GPUS", "DRY_RUN")}
    env["PATH"] = f"{fake.parent}:{env['PATH']}"
    import subprocess

    res = subprocess.run(["bash", SCRIPT, tmp_path / "hf", tmp_path / "data", tmp_path / "out"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no GPU is visible" in res.stderr and "python -m verl_tre.eval" in res.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything ran


def test_default_scoring_uses_the_task_rewards_and_votes_on_their_answers(tmp_path):
    from verl_tre.data import sources

    math_path, cd_path = tmp_path / "math.parquet", tmp_path / "countdown.parquet"
    half = [r"so \boxed{\frac12}", r"\boxed{0.5}", r"thus \boxed{1/2}", r"\boxed{3}"]
    write_generation_parquet(math_path, [(sources.MATH, r"\frac{1}{2}", half)])
    fmt = "<think>work</think> <answer>{}</answer>"
    cd = [fmt.format("(1+2)*3"), fmt.format("1 + 2 + 3"), fmt.format("3+2+1"), "6", fmt.format("1+2+3")]
    write_generation_parquet(cd_path, [(sources.COUNTDOWN, {"target": 6, "numbers": [1, 2, 3]}, cd)])
    m = evaluate(load_samples(str(math_path)), [1, 4], progress=False)[sources.MATH]
    # The reference normalization makes \frac12, 0.5 and 1/2 one answer: 3 votes of 4, all correct.
    assert m["pass@1"] == 0.75 and m["maj@4"] == 1.0 and m["maj@1"] == 0.75
    c = evaluate(load_samples(str(cd_path)), [1, 5], progress=False)[sources.COUNTDOWN]
    # "1 + 2 + 3" and "1+2+3" vote together (2 votes) against "(1+2)*3" and "3+2+1"; the bare "6" abstains.
    assert c["pass@1"] == pytest.approx(3 / 5) and c["maj@5"] == 1.0 and c["pass@5"] == 1.0


def test_hh_with_the_server_down_says_what_it_waits_for_and_ends_in_one_line(tmp_path):
    import subprocess
    import sys

    from verl_tre.data import sources

    path = tmp_path / "hh.parquet"
    write_generation_parquet(path, [(sources.HH, None, ["a helpful answer", "no"])])
    frame = pd.read_parquet(path)
    frame["extra_info"] = [{"split": "test", "index": 0, "prompt": "How do I boil an egg?"}]
    frame.to_parquet(path)
    dead = "http://127.0.0.1:9/predict"  # the discard port: nothing listens, connections are refused at once
    kwargs = json.dumps({"hh_url": dead, "hh_deadline": 2})
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")}
    out = subprocess.run([sys.executable, "-m", "verl_tre.eval", str(path), "--reward-kwargs", kwargs], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert any(line.startswith(f"waiting for the HH reward server at {dead}") for line in lines), lines
    assert any(line.startswith("waiting for the reward server: ") for line in lines), lines  # the wait's progress
    assert lines[-1].startswith(f"error: the reward server at {dead} is not ready after 2 s"), lines
    assert "run_with_server.sh" in lines[-1]
