"""Runs of verl's real trainer on CPU keep their identity and their directory: runs that differ by one override
land in two directories and two table rows, a seed reproduces a run and another seed changes it, a changed
configuration is refused before Ray starts (that the same one resumes: the GAE run of test_e2e_trainer.py), a
finished run is not trained again, a second launch into a live run's directory is refused, and a sweep stopped
with Ctrl-C leaves no process behind and resumes within the checkpoint retention. Slow: one shared Ray start-up
for the runs of this process, three one-step runs and a resumed one, and one sweep with its own Ray."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_fixtures import REGION_METRICS, REPO, cpu_overrides, marked_processes
from verl_tre.runs import checkpoints, identity, lock, record, tables
from verl_tre.runs.reading import read_runs
from verl_tre.trainer import config_check, main_ppo, sweep
from verl_tre.utils import process_tree

# Metrics of the first step that depend only on the seed's rollouts and the starting policy (not on the loss's
# regularizer, nor on wall time): equal for two runs with one seed, whatever their entropy coefficients.
ROLLOUT_METRICS = ("response_length/mean", "critic/score/mean", "actor/pg_loss", "actor/entropy")


def _base(assets, *extra):
    keep = [o for o in cpu_overrides(assets, "unused") if not o.startswith("trainer.default_local_dir")]
    return keep + ["algorithm.adv_estimator=grpo", "trainer.total_training_steps=1", "trainer.test_freq=1", *extra]


def _train(overrides) -> Path:
    config = main_ppo.compose_config(overrides)
    main_ppo.run(config)
    return identity.run_dir(config)


def _steps(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps: dict[int, dict] = {}
    for line in lines:
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(record["metrics"])
    return steps


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_keep_their_identity(ray_session, tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # run directories are relative to the launch directory, as in verl
    ppo = _train(_base(tiny_assets, "method=ppo"))
    entropy = _train(_base(tiny_assets, "method=ppo", "actor_rollout_ref.actor.entropy_coeff=0.01"))
    seed2 = _train(_base(tiny_assets, "method=ppo", "verl_tre.seed=2"))
    assert len({ppo, entropy, seed2}) == 3
    assert all(d.parent.parent == tmp_path / "checkpoints" for d in (ppo, entropy, seed2))

    for run in (ppo, entropy):  # every method logs the same statistics (the other methods: test_e2e_trainer.py)
        for number, metrics in _steps(run).items():
            names = REGION_METRICS + ("actor/pg_loss",)
            bad = {n: metrics.get(n) for n in names if not math.isfinite(metrics.get(n, math.nan))}
            assert not bad, (run.name, number, bad)
    summaries = {d: json.loads((d / "run.json").read_text()) for d in (ppo, entropy, seed2)}
    assert summaries[ppo]["method"] == summaries[seed2]["method"] == "ppo"
    assert summaries[entropy]["method"] == "entropy"
    assert summaries[ppo]["seed_group"] == summaries[seed2]["seed_group"] != summaries[entropy]["seed_group"]
    # Seeding: one seed samples the same first rollouts in another run (exactly); another seed samples others.
    first, again, other = _steps(ppo)[1], _steps(entropy)[1], _steps(seed2)[1]
    assert {k: first[k] for k in ROLLOUT_METRICS} == {k: again[k] for k in ROLLOUT_METRICS}
    assert any(first[k] != other[k] for k in ROLLOUT_METRICS)

    # The table: the two seeds of PPO in one row, the Entropy run in its own.
    runs = read_runs([str(ppo), str(entropy), str(seed2)])
    table = tables.to_markdown(runs)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    ppo_rows = [label for label in rows if label.startswith("PPO")]
    entropy_rows = [label for label in rows if label.startswith("Entropy")]
    assert len(ppo_rows) == 1 and "n=2" in rows[ppo_rows[0]], table
    assert len(entropy_rows) == 1 and "n=" not in rows[entropy_rows[0]], table

    # A changed configuration into PPO's directory is refused before Ray.
    pinned = f"trainer.experiment_name={ppo.name}"
    with pytest.raises(config_check.ConfigError, match=r"actor_rollout_ref\.actor\.optim\.lr: 0\.001 -> 0\.002"):
        main_ppo.run(main_ppo.compose_config(_base(tiny_assets, "method=ppo", pinned,
                                                   "actor_rollout_ref.actor.optim.lr=2e-3")))

    # Relaunching a finished run (no checkpoint: save_freq=-1) trains nothing and leaves its record as it was.
    logged = (ppo / "metrics.jsonl").read_text()
    assert json.loads((ppo / "run.json").read_text())["finished"]["step"] == 1
    _train(_base(tiny_assets, "method=ppo"))
    assert "already finished at step 1: nothing to train" in capsys.readouterr().err
    assert (ppo / "metrics.jsonl").read_text() == logged


def _wait_for(what: str, ready, timeout_s: float, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        assert process.poll() is None, f"the sweep ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return value


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_writer_per_run_ctrl_c_and_retention_across_launches(ray_session, tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = str(REPO / "experiments/countdown/1.5b_ppo.sh")
    # Long enough never to finish before the Ctrl-C; the relaunch sets the run's length (not part of its identity).
    keep = [o for o in cpu_overrides(tiny_assets, "unused", steps=50) if not o.startswith("trainer.default_local_dir")]
    # Two kept (the default): verl deletes the oldest before it saves, so with one a Ctrl-C mid-save leaves none.
    overrides = keep + ["algorithm.adv_estimator=grpo", "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=2"]
    job = sweep.plan([script], {}, [1], overrides)[0]
    launch_args = sweep.script_overrides(script, {}, job.overrides)  # what the sweep's run launches with
    run_dir = job.run_dir

    # A sweep of that one run, in its own session as a terminal would start it; everything it starts carries `mark`.
    mark = f"VERL_TRE_TEST_MARK={os.getpid()}_{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, mark.split("=")[0]: mark.split("=")[1]}
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        swept = subprocess.Popen([sys.executable, "-m", "verl_tre.trainer.sweep", script, "--", *overrides],
                                 env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        holder = _wait_for("lock", lambda: lock.holder(run_dir), 300, swept, log)
        assert holder["host"] == socket.gethostname() and holder["pid"] in process_tree.live_descendants(swept.pid)
        # A second launch of the same configuration while the first trains: refused, naming the holder.
        with pytest.raises(config_check.ConfigError, match=rf"pid {holder['pid']} on host .*Wait for that run"):
            main_ppo.run(main_ppo.compose_config(launch_args))
        _wait_for("checkpoint of step 2", lambda: (checkpoints.latest_step(run_dir) or 0) >= 2, 600, swept, log)
        os.killpg(swept.pid, signal.SIGINT)  # Ctrl-C in the sweep's terminal
        assert swept.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        if swept.poll() is None:
            os.killpg(swept.pid, signal.SIGKILL)
            swept.wait()
    assert "interrupted during run 1/1" in log.read_text()
    assert marked_processes(mark) == [], "processes of the sweep's run (Ray's daemons, workers) outlived it"

    # The interrupted run resumes in this process (the lock died with its holder) for one more step, within the
    # retention: two checkpoints on disk, whichever launch wrote them (verl alone would leave three and the data.pt
    # of every older one).
    first_steps, resumed_from = record.logged_steps(run_dir), checkpoints.latest_step(run_dir)
    assert first_steps == list(range(1, max(first_steps) + 1)) and resumed_from >= 2
    # Pruned while it trained: at most the two newest hold a model. A Ctrl-C between a step's save and its log (when
    # the trainer's pruning runs) can leave an older folder holding only its data.pt; the relaunch removes it.
    on_disk = checkpoints.checkpoint_dirs(run_dir)
    with_model = [step for step, folder in on_disk if (folder / "actor").is_dir()]
    assert with_model and min(with_model) >= resumed_from - 1, on_disk
    assert all([f.name for f in folder.iterdir()] == ["data.pt"] for step, folder in on_disk if step < resumed_from - 1)
    end = resumed_from + 1
    relaunch = [*launch_args, f"trainer.total_training_steps={end}"]
    main_ppo.run(main_ppo.compose_config(relaunch))
    assert record.logged_steps(run_dir) == first_steps + [end]  # one writer, in order
    assert [step for step, _ in checkpoints.checkpoint_dirs(run_dir)] == [end - 1, end]
    assert json.loads((run_dir / "run.json").read_text())["finished"]["step"] == end

    # A relaunch of the finished run (checkpoints kept) trains nothing: verl alone would load its last checkpoint
    # and train one step more.
    main_ppo.run(main_ppo.compose_config(relaunch))
    assert record.logged_steps(run_dir)[-1] == end and [s for s, _ in checkpoints.checkpoint_dirs(run_dir)][-1] == end
