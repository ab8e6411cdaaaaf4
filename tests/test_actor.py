"""TREDataParallelPPOActor on CPU: every method, padded and remove-padding paths, against a hand-computed loss."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl import DataProto

import verl.workers.actor.dp_actor as verl_dp_actor
from verl_tre.utils import padding
from verl_tre.utils.cpu_mode import apply_worker_patches
from verl_tre.utils.torch_functional import entropy_from_logits
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor

VOCAB, PROMPT, RESPONSE, BATCH, TEMPERATURE = 96, 5, 6, 4, 0.7

METHODS = {
    "ppo": {},
    "entropy": {"entropy_coeff": 0.05},
    "tre_k": {"entropy_coeff": 0.05, "trust_region": {"mode": "top_k", "top_k": 2}},
    "tre_k1": {"entropy_coeff": 0.05, "trust_region": {"mode": "top_k", "top_k": 1}},
    "tre_p": {"entropy_coeff": 0.05, "trust_region": {"mode": "top_p", "top_p": 0.9}},
    "forking_micro": {"forking_tokens": {"enable": True, "top_ratio": 0.2, "scope": "micro_batch"}},
    "forking_mini": {"forking_tokens": {"enable": True, "top_ratio": 0.2, "scope": "mini_batch"}},
    "kl_cov": {"policy_loss": {"loss_mode": "clipped_kl_cov", "kl_cov_ratio": 0.1, "ppo_kl_coef": 1.0}},
}


@pytest.fixture(scope="module", autouse=True)
def cpu_process_group():
    apply_worker_patches()
    # verl imports these from flash_attn only when CUDA is present.
    for name in padding.__all__:
        if not hasattr(verl_dp_actor, name):
            setattr(verl_dp_actor, name, getattr(padding, name))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(backend="gloo", rank=0, world_size=1)
    yield


def actor_config(method: str, remove_padding: bool):
    base = OmegaConf.load(os.path.join(os.path.dirname(verl_dp_actor.__file__), "../../trainer/config/ppo_trainer.yaml"))
    cfg = OmegaConf.to_container(base.actor_rollout_ref.actor, resolve=False)
    cfg.pop("checkpoint", None)
    cfg.update(
        ppo_mini_batch_size=BATCH,
        ppo_micro_batch_size_per_gpu=BATCH // 2,
        use_remove_padding=remove_padding,
        use_fused_kernels=False,
        use_torch_compile=False,
        entropy_coeff=0.0,
        trust_region={"mode": "full", "top_k": 2, "top_p": 0.99, "max_size": None, "scale": True, "metrics": True,
                      "reference_top_k": [2, 10], "reference_top_p": 0.99},
        forking_tokens={"enable": False, "top_ratio": 0.2, "scope": "micro_batch"},
    )
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(METHODS[method]))


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="sdpa",
        initializer_range=0.3,  # peaked outputs: attention across packed sequences would move log-probs by nats
    )
    return Qwen2ForCausalLM(config)


def make_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 3, 4, 2]
    response_lens = [6, 4, 1, 5]
    input_ids = torch.randint(1, VOCAB, (BATCH, PROMPT + RESPONSE), generator=gen)
    attention_mask = torch.zeros(BATCH, PROMPT + RESPONSE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        attention_mask[i, PROMPT - p : PROMPT + r] = 1  # left-padded prompt, right-padded response
    input_ids = input_ids * attention_mask
    position_ids = torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": input_ids[:, PROMPT:],
        "advantages": torch.randn(BATCH, RESPONSE, generator=gen),
    }
    meta = {"temperature": TEMPERATURE, "micro_batch_size": 2, "use_dynamic_bsz": False}
    return DataProto.from_dict(tensors=batch, meta_info=meta)


def response_logits(model, batch):
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    # Divided in the logits' own dtype (bf16 under autocast), as verl does, so near-ties select the same tokens.
    return (logits / TEMPERATURE).float()[:, PROMPT - 1 : -1]


def hand_loss(model, batch, cfg, logp, forking_threshold=None):
    """The policy loss of one micro-batch from the definitions, in fp64 over the model's logits.

    ``logp`` are the log-probs of verl's own forward pass: on CPU they come out of bf16 logits in bf16, an error
    of ~0.02 nats that would swamp a comparison resting on a few tokens (Forking keeps 2 of 10 here).
    """
    logits = response_logits(model, batch).double()
    mask = batch["attention_mask"][:, PROMPT:].double()
    logp = logp.double()
    old, adv = batch["old_log_probs"].double(), batch["advantages"].double()
    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * cfg.clip_ratio_c), clipped)
    probs = torch.softmax(logits, -1)
    entropy = -(probs * torch.log(probs)).sum(-1)
    pg_mask = mask
    if cfg.forking_tokens.enable:
        valid = entropy[mask.bool()]
        if forking_threshold is None:
            forking_threshold = valid.sort(descending=True).values[math.ceil(0.2 * valid.numel()) - 1]
        pg_mask = mask * (entropy >= forking_threshold)
    pg = (per_token * pg_mask).sum() / pg_mask.sum()
    if cfg.policy_loss.loss_mode == "clipped_kl_cov":
        valid = mask.bool()
        cov = (adv - adv[valid].mean()) * (logp - logp[valid].mean())
        count = max(1, int(valid.sum() * cfg.policy_loss.kl_cov_ratio))
        chosen = torch.where(valid, cov, -torch.inf).flatten().topk(count).indices
        penalty = torch.zeros_like(cov).flatten()
        penalty[chosen] = (logp - old).abs().flatten()[chosen] * cfg.policy_loss.ppo_kl_coef
        pg = pg + (penalty.view_as(mask) * mask).sum() / mask.sum()
    region = cfg.trust_region
    kw = {"top_k": region.top_k} if region.mode == "top_k" else {"top_p": region.top_p} if region.mode == "top_p" else {}
    value = entropy_from_logits(logits, **kw)
    return pg - cfg.entropy_coeff * (value * mask).sum() / mask.sum()


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
@pytest.mark.parametrize("method", list(METHODS))
def test_update_policy_matches_hand_computed_loss(method, remove_padding):
    cfg = actor_config(method, remove_padding)
    model = tiny_policy()
    reference_model = copy.deepcopy(model)
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = make_batch()

    log_probs, entropy = actor.compute_log_prob(data, calculate_entropy=True)
    mask = data.batch["attention_mask"][:, PROMPT:].bool()
    logits = response_logits(reference_model, data.batch)
    expected_logp = torch.log_softmax(logits, -1).gather(-1, data.batch["responses"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(log_probs.float()[mask], expected_logp[mask], rtol=0.0, atol=0.1)
    torch.testing.assert_close(entropy[mask], entropy_from_logits(logits)[mask], rtol=0.0, atol=0.1)

    gen = torch.Generator().manual_seed(2)
    data.batch["old_log_probs"] = (log_probs.float() + 0.3 * torch.randn(log_probs.shape, generator=gen)) * mask
    halves = [data.batch[:2], data.batch[2:]]
    threshold = None
    if method == "forking_mini":
        logits = response_logits(reference_model, data.batch).double()
        probs = torch.softmax(logits, -1)
        valid = (-(probs * probs.log()).sum(-1))[mask]
        threshold = valid.sort(descending=True).values[math.ceil(0.2 * valid.numel()) - 1]
    with torch.no_grad():
        verl_logps = [actor._forward_micro_batch(half, TEMPERATURE)[1] for half in halves]
    expected = [hand_loss(reference_model, half, cfg, lp, threshold).item() for half, lp in zip(halves, verl_logps)]

    before = [p.detach().clone() for p in model.parameters()]
    metrics = actor.update_policy(data)
    # The padded forward is the hand computation's own; the packed one rounds its bf16 logits differently.
    assert metrics["actor/policy_loss"] == pytest.approx(expected, rel=1e-3, abs=1e-3 if remove_padding else 1e-5)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    names = ["ref/entropy_full", "regularizer/value", "ref/top1_prob", "ref/tail_mass_top2", "pg_loss", "grad_norm"]
    if method.startswith("forking"):
        names += ["forking_threshold", "forking_kept_frac"]
    if method == "kl_cov":
        names += ["kl_cov_tokens"]
    for name in names:
        values = metrics[f"actor/{name}"]
        assert values and all(math.isfinite(v) for v in values), name
    if method.startswith("forking"):
        assert all(0 < f <= 0.5 for f in metrics["actor/forking_kept_frac"])
    if method == "tre_p":
        assert all(1 <= s <= VOCAB for s in metrics["actor/regularizer/region_size"])
    if method == "ppo":
        torch.testing.assert_close(torch.tensor(metrics["actor/regularizer/value"]), torch.tensor(metrics["actor/ref/entropy_full"]))


def test_padded_and_remove_padding_paths_agree():
    # On CPU the packed (remove-padding) forward relies on transformers' SDPA mask splitting sequences at position_ids
    # resets; a bf16 ulp is 0.016 nats here, mixing sequences would differ by several nats.
    data = make_batch()
    outputs = []
    for rmpad in (False, True):
        actor = TREDataParallelPPOActor(actor_config("tre_p", rmpad), tiny_policy(), None)
        outputs.append(actor.compute_log_prob(data, calculate_entropy=True))
    mask = data.batch["attention_mask"][:, PROMPT:].bool()
    torch.testing.assert_close(outputs[0][0].float()[mask], outputs[1][0].float()[mask], rtol=0.0, atol=0.1)
    torch.testing.assert_close(outputs[0][1][mask], outputs[1][1][mask], rtol=0.0, atol=0.1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"entropy_coeff": -0.1}, "entropy_coeff must be >= 0"),
        ({"trust_region": {"mode": "top_q"}}, "mode must be one of"),
        ({"trust_region": {"mode": "top_k", "top_k": 0}}, "top_k must be an integer >= 1"),
        ({"trust_region": {"mode": "top_p", "top_p": 1.0}}, "open interval"),
        ({"forking_tokens": {"top_ratio": 0.0}}, "top_ratio must be in"),
        ({"forking_tokens": {"scope": "global"}}, "scope must be one of"),
        ({"forking_tokens": {"enable": True}, "policy_loss": {"loss_mode": "clipped_kl_cov"}}, "cannot be combined"),
        ({"policy_loss": {"loss_mode": "clipped_kl_cov", "kl_cov_ratio": 0.0}}, "kl_cov_ratio must be in"),
    ],
)
def test_invalid_options_fail_when_the_actor_is_built(override, message):
    cfg = OmegaConf.merge(actor_config("ppo", False), OmegaConf.create(override))
    with pytest.raises(ValueError, match=message):
        TREDataParallelPPOActor(cfg, tiny_policy(), None)


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
def test_dynamic_batch_size_update(remove_padding):
    cfg = OmegaConf.merge(
        actor_config("tre_p", remove_padding),
        OmegaConf.create({"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": 2 * (PROMPT + RESPONSE)}),
    )
    model = tiny_policy()
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = make_batch()
    data.meta_info.update(use_dynamic_bsz=True, max_token_len=2 * (PROMPT + RESPONSE))
    log_probs, _ = actor.compute_log_prob(data)
    data.batch["old_log_probs"] = log_probs.float()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = actor.update_policy(data)
    assert len(metrics["actor/policy_loss"]) >= 2  # the token budget split the mini-batch
    assert all(math.isfinite(v) for v in metrics["actor/policy_loss"] + metrics["actor/regularizer/value"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
