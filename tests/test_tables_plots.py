"""Run records, tables and plots from the fixture of two tiny CPU runs (tests/fixtures/runs)."""

import json
import os
import re
import shutil

import matplotlib.image as mpimg
import pytest

from verl_tre.runs import plots, tables
from verl_tre.runs.reading import detect_method, detect_model_size, find_run_dirs, read_run, read_runs

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "runs")
PPO = os.path.join(FIXTURES, "countdown_tiny_ppo")
TRE_K = os.path.join(FIXTURES, "countdown_tiny_tre_k")
VAL_KEY = "val-core/countdown/reward/mean@1"


def raw_records(path):
    """Complete JSON lines of a metrics.jsonl, read independently of verl_tre.runs.reading."""
    out = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def val_values(path):
    """Validation values in step order, later records of a step replacing earlier ones."""
    by_step = {r["step"]: r["metrics"][VAL_KEY] for r in raw_records(path) if VAL_KEY in r["metrics"]}
    return [by_step[s] for s in sorted(by_step)]


def repeated_steps(path):
    steps = [r["step"] for r in raw_records(path)]
    return sorted({s for s in steps if steps.count(s) > 1})


def test_the_fixtures_are_a_resumed_run_and_a_killed_run():
    # What make_fixtures.py leaves: the PPO run resumed from step 4 after losing its step-6 checkpoint, the TRE-K
    # run cut in the middle of its last line.
    assert repeated_steps(PPO) == [4, 5, 6] and not repeated_steps(TRE_K)
    assert max(r["step"] for r in raw_records(PPO)) == 8
    last = open(os.path.join(TRE_K, "metrics.jsonl")).read().splitlines()[-1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(last)


def test_reading_the_fixture_runs_tolerates_resume_and_truncation():
    notes = []
    ppo, tre = read_runs([FIXTURES], report=notes.append)
    assert (ppo.method, tre.method) == ("ppo", "tre_k")
    assert ppo.task == tre.task == "countdown" and ppo.model_size is None
    assert any("truncated" in n for n in notes)
    assert [s for s in repeated_steps(PPO) if any(f"step {s} logged more than once" in n for n in notes)] == [4, 5, 6]
    records = raw_records(PPO)
    # Each metric of a repeated step keeps its last value: the resumed launch's validation at step 4 replaces
    # the first launch's, and step 4's training metrics (logged once) stay.
    for step in repeated_steps(PPO):
        expected = {}
        for r in records:
            if r["step"] == step:
                expected.update(r["metrics"])
        for name, value in expected.items():
            assert ppo.metrics.loc[step, name] == pytest.approx(value, nan_ok=True), (step, name)
    step4 = [r["metrics"] for r in records if r["step"] == 4]
    assert "critic/score/mean" in step4[0] and "critic/score/mean" not in step4[1] and VAL_KEY in step4[1]
    assert list(ppo.metrics.index) == sorted(set(r["step"] for r in records))
    assert tre.metrics.index.max() == max(r["step"] for r in raw_records(TRE_K))
    assert ppo.validation_key() == VAL_KEY
    assert tre.series("actor/regularizer/value") is not None and tre.series("actor/regularizer/region_size").max() == 2


def test_markdown_table_cells_are_final_or_best_validation_in_percent():
    runs = read_runs([PPO, TRE_K])
    for pick, reduce in (("final", lambda v: v[-1]), ("best", max)):
        md = tables.to_markdown(runs, pick=pick, paper_grid=True)
        lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in md.splitlines() if ln.startswith("| ")}
        header = lines["Method"]
        col = header.index("Countdown other size")
        assert lines["PPO"][col] == f"{100 * reduce(val_values(PPO)):.2f}"
        assert lines["TRE-K"][col] == f"{100 * reduce(val_values(TRE_K)):.2f}"
        # All six methods and the paper's six columns stay, missing cells marked.
        assert {"PPO", "Entropy", "Forking Tokens", "KL-Cov", "TRE-K", "TRE-P"} <= set(lines)
        assert lines["TRE-P"] == ["—"] * len(header)
        assert header == ["MATH 1.5b", "MATH 7b", "Countdown 1.5b", "Countdown 7b", "Countdown other size", "HH 1.5b", "HH 7b"]
        assert "74.29" in md and "3.8764" in md


def test_cells_average_several_runs_and_mark_runs_without_validation(tmp_path):
    for name in ("seed0", "seed1", "noval"):
        shutil.copytree(TRE_K, tmp_path / name)
    # A third run that never validated.
    with open(tmp_path / "noval" / "metrics.jsonl", "w") as f:
        for rec in raw_records(TRE_K):
            rec["metrics"].pop(VAL_KEY, None)
            f.write(json.dumps(rec) + "\n")
    runs = read_runs([str(tmp_path)])
    _, _, cells = tables.build_cells(runs)
    cell = cells[("TRE-K", "countdown", None)]  # older records (no seed fields): grouped by method, task and size
    assert len(cell.runs) == 3 and cell.scores.count(None) == 1
    text = tables.format_cell(cell, "countdown")
    assert text == f"{100 * val_values(TRE_K)[-1]:.2f} ± 0.00 (n=2) [1 no val]"


def test_latex_table_is_well_formed(tmp_path):
    tex = tables.to_latex(read_runs([FIXTURES]), pick="best", paper_grid=True)
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and not ln.startswith(("Method", " &", "Paper"))]
    assert len(body) == 6
    n_cols = re.search(r"\\begin\{tabular\}\{l(r+)\}", tex)[1].count("r")
    assert all(ln.count("&") == n_cols for ln in body)
    # The header spans each task's columns contiguously: 2 + 3 + 2 here.
    assert r"\multicolumn{3}{c}{Countdown}" in tex and r"\cmidrule(lr){4-6}" in tex
    tables.main([FIXTURES, "--out-dir", str(tmp_path)])
    assert (tmp_path / "table.md").read_text().count("\n| ") >= 3 and (tmp_path / "table.tex").exists()


def test_plots_one_figure_per_task_and_size_with_missing_panels_marked(tmp_path):
    paths = plots.make_plots(read_runs([FIXTURES]), str(tmp_path), smooth=2)
    assert sorted(os.path.basename(p) for p in paths) == ["countdown_other_size.pdf", "countdown_other_size.png"]
    img = mpimg.imread(paths[0] if paths[0].endswith("png") else paths[1])
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert open(next(p for p in paths if p.endswith(".pdf")), "rb").read(4) == b"%PDF"
    # A run that never logged the regularizer's value: that panel says so, the others carry its line.
    bare = tmp_path / "bare_ppo"
    bare.mkdir()
    with open(bare / "metrics.jsonl", "w") as f:
        for rec in raw_records(PPO):
            rec["metrics"].pop("actor/regularizer/value", None)
            f.write(json.dumps(rec) + "\n")
    shutil.copy(os.path.join(PPO, "run.json"), bare / "run.json")
    fig = plots.plot_group(read_runs([str(bare)]), "PPO only")
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert [t.get_text() for t in panel["Regularizer value (method-specific)"].texts] == ["not logged"]
    assert len(panel["Training reward"].lines) == 1 and not panel["Training reward"].texts
    xs, ys = panel["Validation score"].lines[0].get_data()
    assert list(ys) == pytest.approx(val_values(PPO))
    plots.main([FIXTURES, "--out", str(tmp_path / "cli")])
    assert len(os.listdir(tmp_path / "cli")) == 2


def test_method_and_size_detection_without_run_json(tmp_path):
    def cfg(**actor):
        return {"actor_rollout_ref": {"actor": {"entropy_coeff": 0.0, "policy_loss": {"loss_mode": "vanilla"}, **actor}}}

    # The trainer's own option names (verl_tre.runs.methods).
    assert detect_method(cfg()) == "ppo"
    assert detect_method(cfg(entropy_coeff=0.001)) == "entropy"
    assert detect_method(cfg(entropy_coeff=0.001, trust_region={"mode": "top_k", "top_k": 2})) == "tre_k"
    assert detect_method(cfg(entropy_coeff=0.001, trust_region={"mode": "top_p", "top_p": 0.99})) == "tre_p"
    assert detect_method(cfg(forking_tokens={"enable": True})) == "forking_tokens"
    assert detect_method(cfg(policy_loss={"loss_mode": "clipped_kl_cov"})) == "kl_cov"
    assert detect_method({}) is None
    assert detect_model_size("/models/Qwen2.5-7B-Instruct") == "7b"
    assert detect_model_size("Qwen/Qwen2.5-1.5B-Instruct") == "1.5b"
    assert detect_model_size("tiny-qwen2") is None
    run_dir = tmp_path / "math_ppo_tre_p"
    run_dir.mkdir()
    shutil.copy(os.path.join(PPO, "metrics.jsonl"), run_dir)
    run = read_run(str(run_dir))
    assert (run.method, run.task) == ("tre_p", "math") and any("no run.json" in n for n in run.notes)


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        find_run_dirs([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "metrics": {}}\nnot json\n{"step": 2, "metrics": {}}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_run(str(tmp_path))


def test_figure1_script_computes_with_the_project_entropy_and_writes_both_formats(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_figure1", os.path.join(os.path.dirname(__file__), "..", "figs", "make_figure1.py"))
    fig1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig1)
    z0 = fig1.initial_logits()
    assert z0.shape == (fig1.VOCAB,) and 0.001 < fig1.tail_mass(z0) < 0.01
    _, full = fig1.ascend(z0, {}, steps=3, step_size=0.25)
    _, tre_k = fig1.ascend(z0, {"top_k": 2}, steps=3, step_size=0.25)
    # Flattening the whole vocabulary leaks more into the tail than flattening the top two.
    assert full[-1] - full[0] > 5 * abs(tre_k[-1] - tre_k[0]) > 0
    fig1.main(["--steps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "tre_diagram_panel_A.png").stat().st_size > 10_000
    assert (tmp_path / "tre_diagram_panel_A.pdf").read_bytes()[:4] == b"%PDF"
