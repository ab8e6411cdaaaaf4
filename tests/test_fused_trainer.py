"""The fused lm-head path in the trainer (actor_rollout_ref.model.use_fused_kernels=true): the actor with the fused
forward against the unfused actor on the same model and batch, the plugin's replacement of verl's fused forward,
the configuration, and end-to-end CPU runs through verl's trainer (slow)."""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForTokenClassification

import verl.models.transformers.monkey_patch as verl_monkey_patch
from test_actor import METHODS, PROMPT, TEMPERATURE, actor_config, cpu_process_group, make_batch, tiny_policy  # noqa: F401
from trainer_fixtures import cpu_overrides
from verl_tre import plugin
from verl_tre.models import fused_forward
from verl_tre.runs import record
from verl_tre.utils.torch_functional import EntropyTerms, TrustRegion, entropy_terms
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor


@pytest.fixture
def fp32_forward(monkeypatch):
    """verl's actor hard-codes a bf16 autocast; disabling it lets both paths run in fp32, so that they can be
    compared to fp32 rounding rather than to bf16's 0.02 nats."""
    real = torch.autocast

    def no_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        return real(device_type, enabled=False)

    monkeypatch.setattr(torch, "autocast", no_autocast)


def build_actor(cfg, model, fused: bool, lr=0.5):
    cfg = OmegaConf.merge(cfg, OmegaConf.create({"use_fused_kernels": fused}))
    if fused:
        fused_forward.install_forward(model)
    return TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=lr))


def _old_log_probs(data, log_probs):
    mask = data.batch["attention_mask"][:, PROMPT:].bool()
    gen = torch.Generator().manual_seed(2)
    return (log_probs.float() + 0.3 * torch.randn(log_probs.shape, generator=gen)) * mask


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
@pytest.mark.parametrize("method", list(METHODS))
def test_update_policy_equals_the_unfused_actor(method, remove_padding, fp32_forward):
    cfg = actor_config(method, remove_padding)
    model = tiny_policy()
    models = {"unfused": model, "fused": copy.deepcopy(model)}
    actors = {name: build_actor(cfg, m, fused=name == "fused") for name, m in models.items()}
    data = make_batch()
    mask = data.batch["attention_mask"][:, PROMPT:].bool()

    outputs = {name: actor.compute_log_prob(data, calculate_entropy=True) for name, actor in actors.items()}
    for got, want in zip(outputs["fused"], outputs["unfused"]):
        torch.testing.assert_close(got.float()[mask], want.float()[mask], rtol=1e-5, atol=1e-5)
    data.batch["old_log_probs"] = _old_log_probs(data, outputs["unfused"][0])

    before = [p.detach().clone() for p in model.parameters()]
    metrics = {name: actor.update_policy(copy.deepcopy(data)) for name, actor in actors.items()}
    assert metrics["fused"].keys() == metrics["unfused"].keys()
    for key, want in metrics["unfused"].items():
        assert metrics["fused"][key] == pytest.approx(want, rel=1e-4, abs=1e-5), key
    assert any(k.startswith("actor/ref/nucleus_size") for k in metrics["fused"])
    moved = False
    for b, p_fused, p_unfused in zip(before, models["fused"].parameters(), models["unfused"].parameters()):
        delta_fused, delta_unfused = p_fused.detach() - b, p_unfused.detach() - b
        torch.testing.assert_close(delta_fused, delta_unfused, rtol=1e-4, atol=1e-6)
        moved |= bool(delta_unfused.abs().max() > 1e-4)
    assert moved


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
@pytest.mark.parametrize("method", ["tre_k", "tre_p"])
def test_entropy_columns_equal_the_unfused_actors_under_bf16_autocast(method, remove_padding):
    """As in training (bf16 autocast): the fused lm head multiplies the same bf16 operands as the model's lm_head,
    so every entropy column equals the unfused actor's; the log-probs are fp32 where verl's are bf16."""
    cfg = actor_config(method, remove_padding)
    model = tiny_policy()
    actors = [build_actor(cfg, m, fused=f) for m, f in ((model, False), (copy.deepcopy(model), True))]
    batch = make_batch().batch
    outputs = []
    for actor in actors:
        with torch.no_grad(), actor._entropy_mode(actor.tre.region, needs_grad=False):
            outputs.append(actor._forward_micro_batch(batch, TEMPERATURE, calculate_entropy=True))
    (want_columns, want_logp), (columns, log_probs) = outputs
    mask = batch["attention_mask"][:, PROMPT:].bool()
    assert columns.shape == want_columns.shape and columns.shape[-1] == len(EntropyTerms._fields)
    for index, name in enumerate(EntropyTerms._fields):
        torch.testing.assert_close(columns[..., index][mask], want_columns[..., index][mask], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(log_probs[mask], want_logp.float()[mask], rtol=0.0, atol=0.05)


def test_actor_refuses_a_model_without_the_fused_forward():
    cfg = OmegaConf.merge(actor_config("tre_k", True), OmegaConf.create({"use_fused_kernels": True}))
    with pytest.raises(ValueError, match="fused forward"):
        TREDataParallelPPOActor(cfg, tiny_policy(), None)


def test_plugin_replaces_verls_fused_forward_and_keeps_generation(monkeypatch):
    import verl.workers.actor as verl_actor

    # Restored after the test: what install() replaces, and trl's missing value head (as the workers do).
    monkeypatch.setattr(verl_monkey_patch, "patch_forward_with_backends", verl_monkey_patch.patch_forward_with_backends)
    monkeypatch.setattr(verl_actor, "DataParallelPPOActor", verl_actor.DataParallelPPOActor)
    monkeypatch.setattr(verl_monkey_patch, "is_trl_available", lambda: False)
    plugin.install()
    assert verl_monkey_patch.patch_forward_with_backends is fused_forward.patch_forward_with_backends
    model = tiny_policy()
    class_forward = type(model).forward
    verl_monkey_patch.apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(model).forward is class_forward  # verl's class-level patch did not happen
    assert fused_forward.is_installed(model)
    ids = torch.randint(1, 90, (2, 7))
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 7, 96)  # without an active head: the model's own forward
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 10)
    from verl_tre.utils.torch_functional import _Reference
    from verl_tre.workers.actor.dp_actor import terms_to_columns

    reference = _Reference((2,), 0.9)
    head = fused_forward.FusedHead(TrustRegion(mode="top_k", top_k=2), reference, True, True, terms_to_columns)
    with fused_forward.active(head):
        fused = model(input_ids=ids, temperature=0.5, return_dict=True)
    labels = torch.roll(ids, -1, -1)
    z = out.logits.detach() / 0.5
    torch.testing.assert_close(fused.log_probs, torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    unfused = terms_to_columns(entropy_terms(z, top_k=2, reference_top_k=(2,), reference_top_p=0.9))
    torch.testing.assert_close(fused.entropy, unfused, rtol=1e-5, atol=1e-5)
    # The critic (a value model, built without use_fused_kernels) keeps its forward.
    critic = Qwen2ForTokenClassification(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, num_key_value_heads=2, num_labels=1))
    verl_monkey_patch.apply_monkey_patch(critic, use_remove_padding=True)
    assert not fused_forward.is_installed(critic)


def test_ulysses_labels_are_sliced_after_the_roll(monkeypatch):
    """With sequence parallelism each rank sees a slice of the packed ids; its labels must be the slice of the
    globally rolled ids (the model-side roll of the slice would take the slice's own first token at its end)."""
    import verl.utils.ulysses as ulysses

    cfg = OmegaConf.merge(actor_config("tre_k", True), OmegaConf.create({"ulysses_sequence_parallel_size": 2}))
    actor = build_actor(cfg, tiny_policy(), fused=True)
    batch = make_batch().batch
    mask = batch["attention_mask"].bool()
    packed = batch["input_ids"][mask]
    rolled = torch.roll(packed, -1)
    pad = (-packed.numel()) % 2
    rolled = torch.cat([rolled, torch.zeros(pad, dtype=rolled.dtype)])
    half = rolled.numel() // 2
    # Two sequence-parallel ranks, as seen by verl's slicing helper (the process group itself has one).
    monkeypatch.setattr(ulysses, "dist", types.SimpleNamespace(get_world_size=lambda group=None: 2))
    for rank in (0, 1):
        monkeypatch.setattr(ulysses, "get_ulysses_sequence_parallel_rank", lambda group=None, r=rank: r)
        labels = actor._ulysses_labels(batch)
        assert labels.shape == (1, half)
        torch.testing.assert_close(labels[0], rolled[rank * half : (rank + 1) * half])
    own_slice = torch.cat([packed, torch.zeros(pad, dtype=packed.dtype)])[:half]
    assert not torch.equal(torch.roll(own_slice, -1), rolled[:half])  # what the model-side roll would give


def test_options_and_config_accept_fused_kernels_with_every_method(capsys):
    from verl_tre.trainer import config_check, main_ppo

    for method in ("tre_k", "tre_p", "kl_cov", "forking_tokens"):
        config = main_ppo.compose_config([f"method={method}", "actor_rollout_ref.model.use_fused_kernels=true",
                                          "trainer.device=cpu", "verl_tre.dry_run=true"])
        main_ppo.run(config)
        assert config.actor_rollout_ref.model.use_fused_kernels is True  # CPU mode keeps it
    err = capsys.readouterr().err
    assert "actor lm head: use_fused_kernels=true: verl_tre's fused lm-head path" in err
    off = main_ppo.compose_config(["method=tre_k"])
    assert config_check.lm_head_backend(off).startswith("use_fused_kernels=false")


def _records(run_dir):
    summary = json.loads((run_dir / record.RUN_FILE).read_text())
    lines = [json.loads(line) for line in (run_dir / record.METRICS_FILE).read_text().splitlines()]
    return summary, lines


# TRE-K on the remove-padding forward, TRE-P on the padded one (update_policy above checks every method on both).
E2E = {
    "tre_k": ["method=tre_k"],
    "tre_p-padded": ["method=tre_p", "actor_rollout_ref.model.use_remove_padding=false"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", list(E2E))
def test_grpo_with_fused_kernels(method, ray_session, tiny_assets, tmp_path):
    from verl_tre.trainer import main_ppo

    run_dir = tmp_path / "run"
    overrides = cpu_overrides(tiny_assets, run_dir) + E2E[method] + [
        "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.model.use_fused_kernels=true",
    ]
    main_ppo.run(main_ppo.compose_config(overrides))
    summary, steps = _records(run_dir)
    assert summary["method"] == method.split("-")[0]
    assert summary["config"]["actor_rollout_ref"]["model"]["use_fused_kernels"] is True
    assert [s["step"] for s in steps] == [1, 2]
    names = ("actor/ref/entropy_full", "actor/ref/top1_prob", "actor/ref/tail_mass_top2", "actor/ref/tail_mass_top10",
             "actor/ref/nucleus_size_p0.99", "actor/regularizer/value", "actor/regularizer/region_mass",
             "actor/regularizer/region_size", "actor/pg_loss", "actor/entropy", "critic/score/mean")
    for step in steps:
        missing = [n for n in names if n not in step["metrics"]]
        assert not missing, missing
        assert all(math.isfinite(step["metrics"][n]) for n in names)
        size = step["metrics"]["actor/regularizer/region_size"]
        assert size == 2 if method == "tre_k" else size >= 1
        assert 0 < step["metrics"]["actor/regularizer/region_mass"] <= 1
