"""The Llama architecture (SmolLM2's: tied embeddings, grouped-query attention, a vocabulary of 517 tokens, not
padded to a multiple) through TREDataParallelPPOActor on the padded, remove-padding and fused lm-head paths: its
log-probs, entropy and reference statistics, and one update's gradient, against a brute force that runs the plain
HF model on each sequence alone (no padding, no packing) and computes the loss from the definitions in fp64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto

from test_actor import actor_config, cpu_process_group  # noqa: F401  (fixture)
from verl_tre.models import fused_forward
from verl_tre.utils.local_assets import tiny_llama_model
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor

VOCAB, PROMPT, RESPONSE, TEMPERATURE, COEFF = 517, 6, 5, 0.7, 0.05
PROMPT_LENS, RESPONSE_LENS = (6, 3, 4, 2), (5, 4, 1, 3)
PATHS = {"padded": (False, False), "rmpad": (True, False), "fused-rmpad": (True, True), "fused-padded": (False, True)}
REGIONS = {"entropy": {}, "tre_k": {"mode": "top_k", "top_k": 2}, "tre_p": {"mode": "top_p", "top_p": 0.9}}


class GradientRecorder(torch.optim.Optimizer):
    """Keeps the gradient the actor hands to optimizer.step() and leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]


def llama():
    return tiny_llama_model(VOCAB, hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=64,
                            initializer_range=0.2).eval()


def make_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch = len(PROMPT_LENS)
    mask = torch.zeros(batch, PROMPT + RESPONSE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        mask[i, PROMPT - p : PROMPT + r] = 1  # left-padded prompt, right-padded response
    ids = torch.randint(0, VOCAB, mask.shape, generator=gen) * mask
    tensors = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
               "responses": ids[:, PROMPT:], "advantages": torch.randn(batch, RESPONSE, generator=gen)}
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": TEMPERATURE, "micro_batch_size": 2,
                                                           "use_dynamic_bsz": False})


def response_logits(model, batch) -> torch.Tensor:
    """[B, R, V] fp64 temperature-scaled logits of each response token, each sequence run alone (zeros past it)."""
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        p, r = int(mask[:PROMPT].sum()), int(mask[PROMPT:].sum())
        ids = ids[PROMPT - p : PROMPT + r]
        logits = model(input_ids=ids[None]).logits[0, p - 1 : p + r - 1].double() / TEMPERATURE
        rows.append(torch.cat([logits, logits.new_zeros(RESPONSE - r, VOCAB)]))
    return torch.stack(rows)


def region_value(logits, region: dict) -> torch.Tensor:
    """The regularizer from its definition: entropy of the softmax renormalized over the region (chosen without
    gradient), times log V / log |T| for TRE (0 for a one-token region)."""
    if not region:
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    with torch.no_grad():
        order = logits.argsort(-1, descending=True)
        if region["mode"] == "top_k":
            inside = torch.arange(VOCAB) < region["top_k"]
        else:  # a token is in the nucleus iff the mass ranked before it is below p
            before = logits.softmax(-1).gather(-1, order).cumsum(-1) - logits.softmax(-1).gather(-1, order)
            inside = before < region["top_p"]
        inside = torch.zeros(order.shape, dtype=torch.bool).scatter(-1, order, inside.expand_as(order))
    z = logits.masked_fill(~inside, -math.inf)
    entropy = -(z.softmax(-1) * z.log_softmax(-1).nan_to_num(neginf=0.0)).sum(-1)
    size = inside.sum(-1).double()
    return torch.where(size > 1, entropy * math.log(VOCAB) / size.clamp(min=2).log(), 0.0)


def reference_stats(logits) -> dict:
    probs = logits.softmax(-1).sort(-1, descending=True).values
    return {"actor/ref/entropy_full": region_value(logits, {}), "actor/ref/top1_prob": probs[..., 0],
            "actor/ref/tail_mass_top2": probs[..., 2:].sum(-1), "actor/ref/tail_mass_top10": probs[..., 10:].sum(-1)}


def brute_force_update(model, batch, cfg, region):
    """Per micro-batch metrics and the gradient of verl's loss: per micro-batch token means of the clipped PPO
    objective (dual clip) minus COEFF times the regularizer, divided by the gradient accumulation."""
    model.zero_grad()
    metrics, accumulation = {}, 2
    for rows in (slice(0, 2), slice(2, 4)):
        micro = batch[rows]
        logits = response_logits(model, micro)
        mask = micro["attention_mask"][:, PROMPT:].double()
        logp = logits.log_softmax(-1).gather(-1, micro["responses"][..., None])[..., 0]
        adv, ratio = micro["advantages"].double(), torch.exp(logp - micro["old_log_probs"].double())
        clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
        per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * cfg.clip_ratio_c), clipped)
        value = region_value(logits, region)
        mean = lambda t: (t * mask).sum() / mask.sum()  # noqa: E731
        (mean(per_token) - COEFF * mean(value)).div(accumulation).backward()
        for name, stat in {"actor/regularizer/value": value, **reference_stats(logits.detach())}.items():
            metrics.setdefault(name, []).append(mean(stat.detach()).item())
    return metrics, [p.grad.clone() for p in model.parameters()]


def build_actor(model, remove_padding, fused, region):
    cfg = OmegaConf.merge(actor_config("ppo", remove_padding), OmegaConf.create({
        "use_fused_kernels": fused, "entropy_coeff": COEFF, "grad_clip": 1e30,  # the raw gradient reaches step()
        "trust_region": {"mode": "full", **region}}))
    if fused:
        fused_forward.install_forward(model)
    return TREDataParallelPPOActor(cfg, model, GradientRecorder(model.parameters())), cfg


@pytest.mark.parametrize("region", list(REGIONS))
@pytest.mark.parametrize("path", list(PATHS))
def test_actor_on_llama_equals_the_brute_force(path, region):
    remove_padding, fused = PATHS[path]
    model = llama()
    reference = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one parameter gets both gradients
    actor, cfg = build_actor(model, remove_padding, fused, REGIONS[region])
    data = make_batch()
    mask = data.batch["attention_mask"][:, PROMPT:].bool()

    log_probs, entropy = actor.compute_log_prob(data, calculate_entropy=True)
    with torch.no_grad():
        logits = response_logits(reference, data.batch)
    expected_logp = logits.log_softmax(-1).gather(-1, data.batch["responses"][..., None])[..., 0]
    torch.testing.assert_close(log_probs.double()[mask], expected_logp[mask], rtol=0.0, atol=2e-5)
    torch.testing.assert_close(entropy.double()[mask], region_value(logits, {})[mask], rtol=0.0, atol=2e-5)

    gen = torch.Generator().manual_seed(2)
    data.batch["old_log_probs"] = (log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen)) * mask
    metrics = actor.update_policy(data)
    want_metrics, want_grads = brute_force_update(reference, data.batch, cfg, REGIONS[region])
    for name, want in want_metrics.items():
        assert metrics[name] == pytest.approx(want, rel=1e-4, abs=1e-6), name
    names = [n for n, _ in model.named_parameters()]
    assert len(actor.actor_optimizer.grads) == len(want_grads) == len(names)
    for name, got, want in zip(names, actor.actor_optimizer.grads, want_grads):
        scale = want.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got.double(), want.double(), rtol=0.0, atol=1e-4 * scale, msg=name)
