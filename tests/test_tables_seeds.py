"""Seed aggregation in the tables and plots: synthetic run directories with the seed fields of run.json and the
reference-statistics metric names, one row / one line per seed group."""

import json
import statistics

import pytest

from verl_tre.runs import plots, tables
from verl_tre.runs.groups import group_runs
from verl_tre.runs.reading import read_runs

VAL = "val-core/math/acc/mean@1"
REF = ("actor/ref/entropy_full", "actor/ref/top1_prob", "actor/ref/tail_mass_top2", "actor/ref/tail_mass_top10",
       "actor/ref/nucleus_size_p0.99")


def write_run(root, name, method, seed=None, group=None, options=None, val=(0.5,), shift=0.0, seed_fields=True,
              task="math", size="1.5b", config=None, steps=4):
    """A run directory as the trainer leaves it: run.json (with the seed fields unless ``seed_fields`` is False;
    ``config``: its resolved config, default none recorded) and ``steps`` metrics.jsonl lines; metric values
    depend on ``shift`` so groups and seeds differ."""
    path = root / name
    path.mkdir()
    model = f"Qwen2.5-{str(size).upper()}-Instruct"
    info = {"task": task, "model": model, "model_size": size, "method": method, "config": config or {}}
    if seed_fields:
        info.update(seed=seed, seed_group=group, method_options=options or {}, config_hash=f"h{group}")
    (path / "run.json").write_text(json.dumps(info))
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            m = {name: 0.1 * i + shift + 0.01 * step for i, name in enumerate(REF)}
            m.update({"critic/score/mean": shift + 0.1 * step, "response_length/mean": 100 + step + shift,
                      "actor/regularizer/value": 2.0 + shift})
            if step % 2 == 0 and step // 2 <= len(val):
                m[VAL] = val[step // 2 - 1]
            f.write(json.dumps({"step": step, "time": 0.0, "metrics": m}) + "\n")
    return str(path)


def table_rows(md: str) -> dict:
    """First Markdown table of ``md`` as {row label: [cells]}."""
    block = md.split("\n\n")[1]
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in block.splitlines() if ln.startswith("| ")}


@pytest.fixture
def sweep(tmp_path):
    """TRE-K at (K=2, coeff 0.001) over three seeds, (K=4, coeff 0.01) over one, and PPO over two."""
    k2 = {"entropy_coeff": 0.001, "top_k": 2}
    k4 = {"entropy_coeff": 0.01, "top_k": 4}
    write_run(tmp_path, "tre_k2_s0", "tre_k", 0, "g-k2", k2, val=(0.4, 0.5), shift=0.0)
    write_run(tmp_path, "tre_k2_s1", "tre_k", 1, "g-k2", k2, val=(0.5, 0.7), shift=0.2)
    write_run(tmp_path, "tre_k2_s2", "tre_k", 2, "g-k2", k2, val=(0.6, 0.6), shift=0.4)
    write_run(tmp_path, "tre_k4_s0", "tre_k", 0, "g-k4", k4, val=(0.3, 0.35), shift=1.0)
    write_run(tmp_path, "ppo_s0", "ppo", 0, "g-ppo", {}, val=(0.2, 0.25), shift=2.0)
    write_run(tmp_path, "ppo_s1", "ppo", 1, "g-ppo", {}, val=(0.2, 0.45), shift=2.2)
    return tmp_path


def test_seed_groups_become_rows_with_mean_sd_and_n(sweep):
    runs = read_runs([str(sweep)])
    assert sorted((r.seed, r.seed_group) for r in runs if r.method == "ppo") == [(0, "g-ppo"), (1, "g-ppo")]
    rows = table_rows(tables.to_markdown(runs))
    col = rows["Method"].index("MATH 1.5b")
    final = [70.0, 60.0, 50.0]  # last validation of each K=2 seed, in %
    assert rows["TRE-K (K=2, coeff 0.001)"][col] == f"{statistics.fmean(final):.2f} ± {statistics.stdev(final):.2f} (n=3)"
    assert rows["TRE-K (K=4, coeff 0.01)"][col] == "35.00"  # one seed: no sd
    assert rows["PPO"][col] == f"35.00 ± {statistics.stdev([25.0, 45.0]):.2f} (n=2)"
    best = table_rows(tables.to_markdown(runs, pick="best"))
    assert best["TRE-K (K=2, coeff 0.001)"][col].startswith(f"{statistics.fmean([50.0, 70.0, 60.0]):.2f} ± ")
    # Only the rows and columns that have runs, in the paper's method order, K=2 before K=4.
    assert list(rows) == ["Method", "PPO", "TRE-K (K=2, coeff 0.001)", "TRE-K (K=4, coeff 0.01)"]
    assert rows["Method"] == ["MATH 1.5b"]
    # The paper's grid on request: its other methods and columns, empty.
    grid = table_rows(tables.to_markdown(runs, paper_grid=True))
    assert grid["TRE-P"] == ["—"] * 6 and len(grid["Method"]) == 6
    assert grid["PPO"][grid["Method"].index("MATH 1.5b")] == rows["PPO"][0]


def test_only_the_options_that_differ_label_a_row(tmp_path):
    write_run(tmp_path, "a", "tre_k", 0, "ga", {"entropy_coeff": 0.001, "top_k": 2})
    write_run(tmp_path, "b", "tre_k", 0, "gb", {"entropy_coeff": 0.001, "top_k": 10})
    write_run(tmp_path, "c", "entropy", 0, "gc", {"entropy_coeff": 0.01})
    labels = [g.label for g in group_runs(read_runs([str(tmp_path)]))]
    assert labels == ["Entropy", "TRE-K (K=2)", "TRE-K (K=10)"]  # K in numeric order, equal coefficient not shown


def test_groups_that_differ_outside_the_method_options_stay_apart(tmp_path):
    # Same method options, different seed groups (say, another learning rate): two rows, named by seed group.
    write_run(tmp_path, "lr1", "tre_p", 0, "lr1e-6", {"top_p": 0.99}, val=(0.1,))
    write_run(tmp_path, "lr2", "tre_p", 0, "lr3e-6", {"top_p": 0.99}, val=(0.9,))
    rows = table_rows(tables.to_markdown(read_runs([str(tmp_path)])))
    assert rows["TRE-P [lr1e-6]"] == ["10.00"] and rows["TRE-P [lr3e-6]"] == ["90.00"]


def _config(lr=1e-3, model="/models/Qwen2.5-1.5B-Instruct", seed=0, **trainer):
    """The part of a resolved config the labels look at: a hidden key (the learning rate), the model paths, the
    seed and keys outside the training configuration (the run's name, its length)."""
    return {"actor_rollout_ref": {"actor": {"optim": {"lr": lr}}, "model": {"path": model}},
            "critic": {"model": {"path": model}}, "verl_tre": {"seed": seed}, "trainer": trainer}


def test_rows_that_differ_only_in_a_hidden_key_are_labelled_by_it(tmp_path):
    # Two learning rates of PPO, each over two seeds, in a sweep with a TRE-K run: rows and legend entries say
    # "lr", not a hash; the seed and the run's name and length (which differ too) are not shown.
    write_run(tmp_path, "a1", "ppo", 1, "ga", {}, val=(0.2,), config=_config(1e-3, seed=1, experiment_name="a1"))
    write_run(tmp_path, "a2", "ppo", 2, "ga", {}, val=(0.4,), config=_config(1e-3, seed=2, total_training_steps=9))
    write_run(tmp_path, "b1", "ppo", 1, "gb", {}, val=(0.9,), config=_config(3e-6, seed=1))
    write_run(tmp_path, "k", "tre_k", 1, "gk", {"top_k": 2}, val=(0.5,), config=_config(3e-6))
    runs = read_runs([str(tmp_path)])
    rows = table_rows(tables.to_markdown(runs))
    assert list(rows)[1:] == ["PPO (lr 3e-6)", "PPO (lr 1e-3)", "TRE-K"]  # in the learning rate's order
    assert rows["PPO (lr 1e-3)"] == [f"30.00 ± {statistics.stdev([20.0, 40.0]):.2f} (n=2)"]
    legend = [t.get_text() for t in plots.plot_group(runs, "MATH, 1.5b").axes[0].get_legend().get_texts()]
    assert legend == ["PPO (lr 3e-6) (n=1)", "PPO (lr 1e-3) (n=2)", "TRE-K (n=1)"]
    # Several keys: each that differs, by its short name; the critic's path, equal to the actor's, once.
    write_run(tmp_path, "c1", "ppo", 1, "gc", {}, val=(0.6,),
              config=_config(3e-6, model="/models/Qwen2.5-7B-Instruct", seed=1))
    labels = [g.label for g in group_runs(read_runs([str(tmp_path)]))]
    assert labels[:3] == ["PPO (lr 3e-6, model Qwen2.5-1.5B-Instruct)", "PPO (lr 3e-6, model Qwen2.5-7B-Instruct)",
                          "PPO (lr 1e-3, model Qwen2.5-1.5B-Instruct)"]


def test_rows_and_columns_are_those_that_have_runs(tmp_path):
    # A study outside the paper's grid: tasks and sizes the paper does not have, and a model of no known size.
    write_run(tmp_path, "m", "ppo", 0, "gm", {}, val=(0.5,))
    write_run(tmp_path, "a", "tre_k", 0, "ga", {"top_k": 2}, val=(0.25,), task="arithmetic", size="135m")
    write_run(tmp_path, "c", "ppo", 0, "gc", {}, val=(0.75,), task="countdown", size=None)
    md = tables.to_markdown(read_runs([str(tmp_path)]))
    rows = table_rows(md)
    assert rows == {"Method": ["MATH 1.5b", "Countdown other size", "arithmetic 135m"],
                    "PPO": ["50.00", "75.00", "—"], "TRE-K": ["—", "—", "0.2500"]}
    assert "74.29" in md and "HH test reward" not in md  # the paper's figures only for the tasks of the table
    grid = table_rows(tables.to_markdown(read_runs([str(tmp_path)]), paper_grid=True))
    assert grid["Method"] == ["MATH 1.5b", "MATH 7b", "Countdown 1.5b", "Countdown 7b", "Countdown other size",
                              "HH 1.5b", "HH 7b", "arithmetic 135m"]
    assert len(grid) == 7 and grid["Entropy"] == ["—"] * 8 and grid["TRE-K"][-1] == "0.2500"
    tables.main([str(tmp_path), "--paper-grid", "--out-dir", str(tmp_path / "out")])
    assert "HH 7b" in (tmp_path / "out" / "table.md").read_text()


def test_the_table_says_when_rows_end_at_different_steps(tmp_path):
    write_run(tmp_path, "p", "ppo", 0, "gp", {}, steps=4)
    write_run(tmp_path, "e1", "entropy", 0, "ge", {"entropy_coeff": 0.01}, steps=2)
    write_run(tmp_path, "e2", "entropy", 1, "ge", {"entropy_coeff": 0.01}, steps=3)
    write_run(tmp_path, "k", "tre_k", 0, "gk", {"top_k": 2}, steps=2, task="countdown")
    runs = read_runs([str(tmp_path)])
    note = ("Rows end at different steps (their cells compare different amounts of training): MATH 1.5b: PPO at "
            "step 4, Entropy at steps 2-3.")
    assert note in tables.to_markdown(runs) and f"% {note}" in tables.to_latex(runs)
    equal = read_runs([str(tmp_path / "p"), str(tmp_path / "k")])  # one run per column: nothing to compare
    assert "Rows end at different steps" not in tables.to_markdown(equal)


def test_old_records_without_seed_fields_are_grouped_as_before(tmp_path):
    write_run(tmp_path, "old1", "tre_k", seed_fields=False, val=(0.2,))
    write_run(tmp_path, "old2", "tre_k", seed_fields=False, val=(0.4,))
    write_run(tmp_path, "new", "tre_k", 0, "g-new", {"top_k": 2}, val=(0.9,))
    write_run(tmp_path, "ppo_old", "ppo", seed_fields=False, val=(0.5,))
    rows = table_rows(tables.to_markdown(read_runs([str(tmp_path)])))
    # The two old TRE-K runs are one cell labelled as before; the new group beside them is told apart by its K.
    assert rows["TRE-K"] == [f"30.00 ± {statistics.stdev([20.0, 40.0]):.2f} (n=2)"]
    assert rows["TRE-K (K=2)"] == ["90.00"]
    assert rows["PPO"] == ["50.00"]
    # A new group with no options beside old records of the same method: the labels would coincide, so each
    # names its seed group or run.
    write_run(tmp_path, "ppo_new", "ppo", 0, "g-ppo", {}, val=(0.7,))
    rows = table_rows(tables.to_markdown(read_runs([str(tmp_path)])))
    assert rows["PPO [ppo_old]"] == ["50.00"] and rows["PPO [g-ppo]"] == ["70.00"]


def test_statistics_table_holds_comparable_quantities_per_seed_group(sweep):
    md = tables.to_markdown(read_runs([str(sweep)]))
    stats = md.split("Training statistics")[1].split("\n\n")[1]
    header = [c.strip() for c in stats.splitlines()[0].split("|")[1:-1]]
    assert header == ["Task", "Method", "Entropy (nats)", "Top-1 probability", "Mass outside top 2", "Mass outside top 10",
                      "Nucleus size p=0.99 (tokens)", "Response length (tokens)", "Regularizer value (method-specific)"]
    row = next(ln for ln in stats.splitlines() if "TRE-K (K=2, coeff 0.001)" in ln)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    entropy_last = [0.0 + s + 0.04 for s in (0.0, 0.2, 0.4)]  # REF[0] at step 4 for each seed's shift
    assert cells[2] == f"{statistics.fmean(entropy_last):.3f} ± {statistics.stdev(entropy_last):.3f} (n=3)"
    assert cells[7].startswith(f"{statistics.fmean([104.0, 104.2, 104.4]):.1f} ± ")
    assert "(n=" not in next(ln for ln in stats.splitlines() if "K=4" in ln)


def test_latex_rows_are_the_seed_groups(sweep, tmp_path):
    tex = tables.to_latex(read_runs([str(sweep)]))
    assert r"TRE-K (K=2, coeff 0.001) & " in tex and r"$\pm$" in tex and "(n=3)" in tex
    tables.main([str(sweep), "--out-dir", str(tmp_path / "out")])
    assert "(n=3)" in (tmp_path / "out" / "table.md").read_text()


def test_plots_draw_one_line_per_seed_group_with_its_mean_band_and_labels(sweep, tmp_path):
    runs = read_runs([str(sweep)])
    fig = plots.plot_group(runs, "MATH, 1.5b")
    panel = {ax.get_title(): ax for ax in fig.axes}
    assert "Regularizer value (method-specific)" in panel and "Mass outside the top 2 tokens" in panel
    for ax in fig.axes:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel(), ax.get_title()
    ax = panel["Full entropy"]
    assert ax.get_ylabel() == "nats"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["PPO (n=2)", "TRE-K (K=2, coeff 0.001) (n=3)", "TRE-K (K=4, coeff 0.01) (n=1)"]
    steps, mean = ax.lines[1].get_data()
    assert list(steps) == [1, 2, 3, 4]
    assert list(mean) == pytest.approx([statistics.fmean([s + 0.01 * t for s in (0.0, 0.2, 0.4)]) for t in steps])
    assert len(ax.collections) == 2  # min-max bands for the groups of several seeds only
    paths = plots.make_plots(runs, str(tmp_path / "figs"))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["math_1.5b.pdf", "math_1.5b.png"]
