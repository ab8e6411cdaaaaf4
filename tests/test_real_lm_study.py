"""The real-LM study's pieces on tiny assets: the mass-outside statistic against brute force, the base-model probe,
the plan and its configs (validated offline), the results directory's memory, and the restart of interrupted runs."""

import json
import math

import pytest
import torch

from experiments.real_lm import probe, study
from verl_tre.utils.torch_functional import mass_outside


def test_mass_outside_equals_brute_force_and_keeps_small_masses():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 300, generator=gen, dtype=torch.float64) * 3
    logits[0, 7] = 60.0  # a confident row: the mass outside {7} is about 1e-24
    tokens = torch.topk(logits, 10, dim=-1).indices
    tokens[1] = tokens[1, :1]  # repeats allowed
    want = []
    for row, ids in zip(logits, tokens):
        p = torch.softmax(row, -1)
        outside = torch.ones_like(p, dtype=torch.bool)
        outside[ids] = False
        want.append(math.fsum(p[outside].tolist()))
    got = mass_outside(logits, tokens, chunk_rows=7)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert 0 < got[0] < 1e-20
    got32 = mass_outside(logits.float(), tokens)  # fp32 logits: fp32 rounding of the probabilities only
    assert torch.allclose(got32, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-30)


def test_mass_outside_edge_rows():
    z = torch.zeros(3, 4)
    z[1, 0] = math.nan
    z[2] = -math.inf
    got = mass_outside(z, torch.tensor([[0], [0], [0]]))
    assert got[0].item() == pytest.approx(0.75) and math.isnan(got[1]) and math.isnan(got[2])
    assert mass_outside(torch.zeros(2, 5), torch.zeros(2, 0, dtype=torch.long)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"need logits \[N, V\] and tokens \[N, k\]"):
        mass_outside(torch.zeros(2, 5), torch.zeros(3, 1, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from verl_tre.data.arithmetic_task import write_arithmetic_splits
    from verl_tre.utils import local_assets

    root = tmp_path_factory.mktemp("real_lm")
    paths = write_arithmetic_splits(root / "data", num_test=6, max_operand=4, seed=0)
    texts = [f"What is {a} + {b}? Answer with just the number. {a + b}" for a in range(5) for b in range(5)]
    tokenizer = local_assets.train_bpe_tokenizer(texts + ["user\n", "assistant\n"], root / "tok", vocab_size=300)
    return local_assets.tiny_qwen2(root / "model", tokenizer, hidden_size=32, intermediate_size=64), paths


def test_probe_of_the_base_model_is_its_own_mass_outside(tiny_model, tmp_path):
    """The base probe fixes the positions and sets; probing the base weights again gives the base value, and a
    changed model a different one (positions: the greedy continuations, at most max_new each)."""
    model, paths = tiny_model
    probe_file = tmp_path / "probe_base.pt"
    summary = probe.build_base_probe(model, paths["test"], max_new=5, out=probe_file)
    (tmp_path / "base_probe.json").write_text(json.dumps(summary))
    assert summary["prompts"] == 6 and 0 < summary["positions"] <= 30 and summary["top_k"] == probe.TOP_K
    again = probe.probe_run(model, probe_file)
    assert again["mass_outside"] == pytest.approx(summary["base_mass_outside"], rel=1e-6)
    assert again["positions"] == summary["positions"]

    from transformers import AutoModelForCausalLM

    changed = AutoModelForCausalLM.from_pretrained(str(model))
    with torch.no_grad():
        changed.model.norm.weight.mul_(0.2)  # flatter softmax: more mass outside any top 10
    changed.save_pretrained(tmp_path / "changed")
    assert probe.probe_run(tmp_path / "changed", probe_file)["mass_outside"] > summary["base_mass_outside"]


def test_plan_is_seed_major_with_unique_directories_and_shares_runs_with_the_calibration():
    settings = study.StudySettings()
    planned = study.plan(settings)
    assert len(planned) == len(settings.arms) * len(settings.seeds) == 16
    assert [r.seed for r in planned] == sorted(r.seed for r in planned)
    assert len({r.key for r in planned}) == len(planned)
    calibration = {r.key for r in study.plan(study.calibration_settings(settings))}
    assert {"ppo_s1", f"entropy_c{study.STRONG_COEFF:g}_s1"} <= calibration & {r.key for r in planned}
    assert {a.label for a in settings.arms} >= {"PPO", f"TRE-K {study.STRONG_COEFF:g} unscaled", "TRE-P 0.001"}


@pytest.mark.parametrize("arm", study.study_arms(), ids=lambda a: a.key)
def test_every_arm_composes_and_validates(arm, tmp_path, tiny_model):
    from verl_tre.trainer import main_ppo

    model, paths = tiny_model
    run = study.PlannedRun(arm, 1)
    config = main_ppo.compose_config(study.overrides(study.StudySettings(), run, str(model), paths["test"].parent,
                                                     tmp_path / run.key))
    main_ppo.prepare(config, launching=False)
    actor = config.actor_rollout_ref.actor
    assert (actor.entropy_coeff, actor.trust_region.mode, actor.trust_region.scale) == (arm.coeff, arm.mode, arm.scale)
    assert config.trainer.default_local_dir == str(tmp_path / run.key)
    assert config.verl_tre.model_size == "135m" and config.verl_tre.task == "arithmetic"
    assert config.actor_rollout_ref.rollout.n * config.data.train_batch_size == 32


def test_results_directory_refuses_other_run_settings(tmp_path):
    study.check_settings(tmp_path, study.StudySettings())
    study.check_settings(tmp_path, study.calibration_settings(study.StudySettings()))  # same runs' settings
    with pytest.raises(ValueError, match=r"other settings \(lr, steps\)"):
        study.check_settings(tmp_path, study.with_overrides(study.StudySettings(), steps=3, lr=1e-4))


def test_an_interrupted_run_is_cleared_and_a_finished_one_kept(tmp_path):
    said = []
    interrupted, finished, weights = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, summary in ((interrupted, {}), (finished, {"finished": {"step": 8}}), (weights, {})):
        d.mkdir()
        (d / "run.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 3, "time": 0, "metrics": {}}) + "\n")
    study.final_weights(weights, 8).mkdir(parents=True)
    for d in (interrupted, finished, weights):
        study._restart_if_interrupted(d, 8, said.append)
    assert not interrupted.exists() and finished.exists() and weights.exists()
    assert said == ["a: interrupted after step 3 of 8; training it again"]
