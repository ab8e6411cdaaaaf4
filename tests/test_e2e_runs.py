"""Runs of verl's real trainer on CPU keep their identity: runs that differ by one override land in two
directories and two table rows, a seed reproduces a run and another seed changes it, and a changed configuration
is refused before Ray starts (that the same one resumes: the GAE run of test_e2e_trainer.py). Slow: one shared
Ray start-up, three one-step runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer_fixtures import REGION_METRICS, cpu_overrides
from verl_tre import tables
from verl_tre.runs import read_runs
from verl_tre.trainer import config_check, main_ppo, run_identity

# Metrics of the first step that depend only on the seed's rollouts and the starting policy (not on the loss's
# regularizer, nor on wall time): equal for two runs with one seed, whatever their entropy coefficients.
ROLLOUT_METRICS = ("response_length/mean", "critic/score/mean", "actor/pg_loss", "actor/entropy")


def _base(assets, *extra):
    keep = [o for o in cpu_overrides(assets, "unused") if not o.startswith("trainer.default_local_dir")]
    return keep + ["algorithm.adv_estimator=grpo", "trainer.total_training_steps=1", "trainer.test_freq=1", *extra]


def _train(overrides) -> Path:
    config = main_ppo.compose_config(overrides)
    main_ppo.run(config)
    return run_identity.run_dir(config)


def _steps(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps: dict[int, dict] = {}
    for line in lines:
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(record["metrics"])
    return steps


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_keep_their_identity(ray_session, tiny_assets, tmp_path, monkeypatch):
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
    table = tables.to_markdown(runs, compact=True)
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
