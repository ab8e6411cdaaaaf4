"""Reference statistics (top-1 probability, tail mass outside the top K, p-nucleus size, full entropy): the same
fixed regions whatever the regularizer, against a float64 brute force, and logged by the actor for every method."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from test_actor import (  # noqa: F401  (cpu_process_group: the actor tests' autouse fixture)
    BATCH,
    PROMPT,
    actor_config,
    cpu_process_group,
    make_batch,
    response_logits,
    tiny_policy,
)
from verl_tre.utils import torch_functional
from verl_tre.utils.torch_functional import EntropyTerms, entropy_terms, trust_region_stats
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor

KS = (1, 2, 10)
REGULARIZERS = [
    pytest.param({}, id="full"),
    pytest.param({"top_k": 1}, id="k1"),
    pytest.param({"top_k": 2}, id="k2"),
    pytest.param({"top_p": 0.99}, id="p0.99-reused"),
    pytest.param({"top_p": 0.9}, id="p0.9"),
    pytest.param({"top_p": 0.99, "max_region_size": 3}, id="p0.99-cap3"),
]


def brute_force(probs: torch.Tensor, ks, p: float) -> dict:
    """Reference statistics of fp64 probability rows [n, V] (zeros allowed), from the definitions: top-1
    probability, mass outside the K likeliest tokens, and the number of tokens whose preceding mass in order of
    probability is below p (ties do not matter: tied tokens are interchangeable)."""
    probs = probs / probs.sum(dim=-1, keepdim=True)
    ordered = torch.sort(probs, dim=-1, descending=True).values
    head = torch.cumsum(ordered, dim=-1)
    vocab = probs.shape[-1]
    tails = [torch.zeros(len(probs), dtype=torch.float64) if k >= vocab else 1.0 - head[:, k - 1] for k in ks]
    return {
        "entropy_full": -torch.xlogy(probs, probs).sum(dim=-1),
        "top1_prob": ordered[:, 0],
        "tail_mass": torch.stack(tails, dim=-1),
        "nucleus_size": ((head - ordered) < p).sum(dim=-1).double(),
    }


def probabilities_seen(logits: torch.Tensor) -> torch.Tensor:
    """The unnormalized probabilities exp(z - max) the pass works on (fp32 for fp32/bf16 logits), as fp64: the
    nucleus is exact for these (fp64 logits: fp64 throughout)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.exp(z - z.amax(dim=-1, keepdim=True)).double()


def rows(kind: str, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "random":
        return torch.randn(12, vocab, generator=gen) * 3
    if kind == "flat":  # a nucleus of most of the vocabulary
        return torch.randn(6, vocab, generator=gen) * 0.05
    if kind == "ties":  # ties at every top-K and nucleus boundary
        return torch.randint(-4, 2, (12, vocab), generator=gen).float() * 0.5
    if kind == "minus_inf":
        z = torch.randn(8, vocab, generator=gen) * 2
        z[:, 5:] = -math.inf  # fewer finite tokens than the widest K
        z[0, 1:] = -math.inf  # one token carries all the mass
        return z
    if kind == "dominant":
        z = torch.randn(8, vocab, generator=gen)
        z[:, 3] = 60.0
        return z
    raise ValueError(kind)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "flat", "ties", "minus_inf", "dominant"])
@pytest.mark.parametrize("vocab", [7, 300, 1 << 15], ids=["V7", "V300", "V32768-radix"])
def test_reference_statistics_match_brute_force_whatever_the_regularizer(vocab, kind, dtype, regularizer):
    logits = rows(kind, vocab).to(dtype)
    terms = entropy_terms(logits, **regularizer, reference_top_k=KS, reference_top_p=0.99, chunk_size=5)
    ref = brute_force(probabilities_seen(logits), KS, 0.99)
    exact = brute_force(torch.softmax(logits.double(), dim=-1), KS, 0.99)
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(terms.top1_prob.double(), exact["top1_prob"], rtol=0, atol=atol)
    torch.testing.assert_close(terms.tail_mass.double(), exact["tail_mass"], rtol=0, atol=atol)
    torch.testing.assert_close(terms.entropy_full.double(), exact["entropy_full"], rtol=1e-5, atol=atol * 10)
    assert terms.tail_mass.shape == (*logits.shape[:-1], len(KS))
    assert torch.equal(terms.nucleus_size.double(), ref["nucleus_size"])
    assert (terms.tail_mass[..., 1:] <= terms.tail_mass[..., :-1]).all()  # wider K, less outside
    if vocab < 10:
        assert (terms.tail_mass[..., -1] == 0).all()  # K >= V: nothing outside
    if regularizer == {"top_p": 0.99}:
        assert torch.equal(terms.nucleus_size, terms.region_size)  # the training nucleus, reused


def confident_rows(vocab: int, tails) -> torch.Tensor:
    """fp32 logit rows whose mass outside the top 2 is about ``tails[i]`` (two leading tokens near 0.6 / 0.4, the
    rest spread with noise): the late-training regime where 1 - mass of the top K cancels in fp32."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(len(tails), vocab, generator=gen, dtype=torch.float64) * 0.5
    for i, tail in enumerate(tails):
        z[i] += math.log(tail) - torch.logsumexp(z[i, 2:], dim=0)  # the rest's total mass ~ tail (next to ~1)
        z[i, 0], z[i, 1] = math.log(0.6), math.log(0.4)
    return z.float()


def exact_tail_masses(logits: torch.Tensor, ks) -> list[list[float]]:
    """Mass outside the K likeliest tokens, exactly rounded (math.fsum) from the fp64 values of the probabilities
    the pass works on."""
    out = []
    for row in probabilities_seen(logits):
        ordered = sorted(row.tolist(), reverse=True)
        total = math.fsum(ordered)
        out.append([math.fsum(ordered[k:]) / total for k in ks])
    return out


@pytest.mark.parametrize("vocab", [49_152, 1_000])
def test_tail_masses_are_exact_down_to_1e_12_on_confident_rows(vocab):
    """The tail is summed from its own probabilities, not as 1 - top K: a true 4.4e-9 tail read 0 and 5.0e-7 read
    7.4e-7 before; now every row down to 1e-12 is within fp32 rounding of exact arithmetic, top 2 and top 10."""
    tails = (1e-2, 5.0e-7, 4.4e-9, 1e-10, 1e-12)
    logits = confident_rows(vocab, tails)
    terms = entropy_terms(logits, reference_top_k=(2, 10), reference_top_p=None)
    want = torch.tensor(exact_tail_masses(logits, (2, 10)), dtype=torch.float64)
    assert (want[:, 0] > 0.5 * torch.tensor(tails)).all()  # the rows are as confident as intended
    assert torch.allclose(terms.tail_mass.double(), want, rtol=2e-6, atol=0.0)
    assert (terms.tail_mass[:, 1] < terms.tail_mass[:, 0]).all()  # top 10 is not top 2 on any row


def test_fused_tail_masses_are_exact_down_to_1e_12():
    """The fused lm head reports the same exact tails (identity lm head: the hidden states are the logits)."""
    from verl_tre.utils.torch_functional import fused_linear_entropy_terms

    vocab = 512
    logits = confident_rows(vocab, (5.0e-7, 4.4e-9, 1e-12))
    labels = torch.zeros(len(logits), dtype=torch.long)
    _, terms = fused_linear_entropy_terms(logits, torch.eye(vocab), labels, reference_top_k=(2, 10),
                                          reference_top_p=None)
    want = torch.tensor(exact_tail_masses(logits, (2, 10)), dtype=torch.float64)
    assert torch.allclose(terms.tail_mass.double(), want, rtol=2e-6, atol=0.0)


def test_reference_nucleus_is_uncapped_and_independent_of_the_training_p():
    logits = rows("flat", 300)
    base = entropy_terms(logits, reference_top_p=0.99)
    for regularizer in ({"top_p": 0.5}, {"top_p": 0.99, "max_region_size": 3}, {"top_k": 2}):
        terms = entropy_terms(logits, **regularizer, reference_top_p=0.99)
        assert torch.equal(terms.nucleus_size, base.nucleus_size), regularizer
    capped = entropy_terms(logits, top_p=0.99, max_region_size=3, reference_top_p=0.99)
    assert (capped.region_size == 3).all() and (capped.nucleus_size > 100).all()


def test_radix_and_sort_paths_give_the_same_reference_nucleus(monkeypatch):
    logits = rows("ties", 1 << 15)
    fast = entropy_terms(logits, top_k=2, reference_top_k=KS, reference_top_p=0.95)
    monkeypatch.setattr(torch_functional, "_RADIX_MIN_VOCAB", 1 << 30)
    slow = entropy_terms(logits, top_k=2, reference_top_k=KS, reference_top_p=0.95)
    assert torch.equal(fast.nucleus_size, slow.nucleus_size) and torch.equal(fast.tail_mass, slow.tail_mass)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_chunk_size_does_not_change_any_output(regularizer):
    logits = torch.cat([rows("random", 300), rows("ties", 300), rows("minus_inf", 300)])
    one = entropy_terms(logits, **regularizer, reference_top_k=KS, reference_top_p=0.99, chunk_size=1)
    many = entropy_terms(logits, **regularizer, reference_top_k=KS, reference_top_p=0.99, chunk_size=1000)
    for name in EntropyTerms._fields:
        assert torch.equal(getattr(one, name), getattr(many, name)), name


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_reference_statistics_change_neither_the_value_nor_its_gradient(regularizer):
    logits = torch.randn(5, 4, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    grads, values = [], []
    for reference in ({}, {"reference_top_k": KS, "reference_top_p": 0.9}):
        x = logits.clone().requires_grad_()
        terms = entropy_terms(x, **regularizer, **reference)
        (grad,) = torch.autograd.grad((terms.value * torch.linspace(0.5, 1.5, 4)).sum(), x)
        values.append(terms.value.detach())
        grads.append(grad)
        for name in ("top1_prob", "tail_mass", "nucleus_size"):
            assert not getattr(terms, name).requires_grad
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])


def test_statistics_off_or_not_asked_for_are_zero_and_shapes_hold():
    logits = torch.randn(3, 2, 50)
    off = entropy_terms(logits, reference_top_k=(2, 10), reference_top_p=0.99, with_stats=False)
    assert off.tail_mass.shape == (3, 2, 2) and not off.tail_mass.any()
    assert not off.top1_prob.any() and not off.nucleus_size.any()
    none = entropy_terms(logits)
    assert none.tail_mass.shape == (3, 2, 0) and not none.nucleus_size.any()
    torch.testing.assert_close(none.top1_prob, torch.softmax(logits, -1).amax(-1))
    empty = entropy_terms(torch.randn(0, 50), reference_top_k=(2, 10), reference_top_p=0.99)
    assert empty.tail_mass.shape == (0, 2) and empty.nucleus_size.shape == (0,)
    stats = trust_region_stats(logits, reference_top_k=(2,), reference_top_p=0.5)
    assert stats["tail_mass"].shape == (3, 2, 1) and torch.equal(stats["nucleus_size"], entropy_terms(logits, top_p=0.5).region_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference_top_k": (0,)}, "reference_top_k must be a list of integers >= 1"),
        ({"reference_top_k": (2.5,)}, "reference_top_k must be a list of integers >= 1"),
        ({"reference_top_p": 1.0}, "open interval"),
        ({"reference_top_p": 0.0}, "open interval"),
    ],
)
def test_bad_reference_regions_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        entropy_terms(torch.randn(2, 10), **kwargs)


# The actor: every method logs the same reference statistics, on both forward paths.

ACTOR_METHODS = ("ppo", "entropy", "tre_k", "tre_p", "forking_micro", "forking_mini", "kl_cov")
REFERENCE_METRICS = ("actor/ref/entropy_full", "actor/ref/top1_prob", "actor/ref/tail_mass_top2",
                     "actor/ref/tail_mass_top10", "actor/ref/nucleus_size_p0.99")


def _update_metrics(method: str, remove_padding: bool, overrides: dict | None = None):
    cfg = actor_config(method, remove_padding)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    model = tiny_policy()
    actor = TREDataParallelPPOActor(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5))
    data = make_batch()
    log_probs, _ = actor.compute_log_prob(data)
    data.batch["old_log_probs"] = log_probs.float()
    return actor.update_policy(data), data


def _expected_reference_means(data) -> dict:
    """Brute-force token means over each micro-batch's response, from the unchanged model's logits."""
    model = tiny_policy()
    out = {name: [] for name in REFERENCE_METRICS}
    for half in (data.batch[: BATCH // 2], data.batch[BATCH // 2 :]):
        logits = response_logits(model, half)
        mask = half["attention_mask"][:, PROMPT:].bool()
        ref = brute_force(probabilities_seen(logits[mask]), (2, 10), 0.99)
        for name, value in (("entropy_full", ref["entropy_full"]), ("top1_prob", ref["top1_prob"]),
                            ("tail_mass_top2", ref["tail_mass"][:, 0]), ("tail_mass_top10", ref["tail_mass"][:, 1]),
                            ("nucleus_size_p0.99", ref["nucleus_size"])):
            out[f"actor/ref/{name}"].append(value.mean().item())
    return out


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
def test_every_method_logs_the_same_reference_statistics(remove_padding):
    logged = {}
    for method in ACTOR_METHODS:
        metrics, data = _update_metrics(method, remove_padding)
        for name in REFERENCE_METRICS + ("actor/regularizer/value",):
            assert len(metrics[name]) == 2 and all(math.isfinite(v) for v in metrics[name]), (method, name)
        # The trained region's own statistics only where the regularizer has a region.
        has_region = method in ("tre_k", "tre_p")
        assert ("actor/regularizer/region_size" in metrics) == has_region, method
        assert not any(name in metrics for name in ("actor/tre_value", "actor/tail_mass", "actor/topk_prob"))
        logged[method] = metrics
    expected = _expected_reference_means(data)
    for method, metrics in logged.items():
        for name in REFERENCE_METRICS:
            # The forward before the update is the same model for every method: the same numbers.
            torch.testing.assert_close(torch.tensor(metrics[name]), torch.tensor(logged["ppo"][name]), rtol=1e-6, atol=1e-6)
    # The padded forward is the brute force's own; the packed one rounds its bf16 logits differently.
    tol = {"rtol": 1e-4, "atol": 1e-5} if not remove_padding else {"rtol": 0.05, "atol": 0.05}
    for name in REFERENCE_METRICS:
        if name.endswith("nucleus_size_p0.99") and remove_padding:
            continue  # a rounding at the boundary moves the mean by a whole token over ~8 tokens
        torch.testing.assert_close(torch.tensor(logged["ppo"][name]), torch.tensor(expected[name]), **tol, msg=name)
    assert logged["tre_k"]["actor/regularizer/region_size"] == [2.0, 2.0]
    torch.testing.assert_close(torch.tensor(logged["ppo"]["actor/regularizer/value"]),
                               torch.tensor(logged["ppo"]["actor/ref/entropy_full"]))


def test_reference_regions_are_configurable_and_the_nucleus_skippable():
    metrics, _ = _update_metrics("tre_k", False, {"trust_region": {"reference_top_k": [3], "reference_top_p": None}})
    assert "actor/ref/tail_mass_top3" in metrics and "actor/ref/tail_mass_top2" not in metrics
    assert not any(name.startswith("actor/ref/nucleus_size") for name in metrics)
    metrics, _ = _update_metrics("ppo", True, {"trust_region": {"reference_top_p": 0.9}})
    assert "actor/ref/nucleus_size_p0.9" in metrics
    metrics, _ = _update_metrics("ppo", False, {"trust_region": {"metrics": False}})
    assert not any(name.startswith(("actor/ref/", "actor/regularizer/")) for name in metrics)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"reference_top_k": [0, 10]}, "reference_top_k must be a list of distinct integers"),
        ({"reference_top_k": [2, 2]}, "reference_top_k must be a list of distinct integers"),
        ({"reference_top_k": 2}, "reference_top_k must be a list"),
        ({"reference_top_p": 1.5}, "reference_top_p must be in the open interval"),
    ],
)
def test_bad_reference_options_fail_when_the_actor_is_built(override, message):
    cfg = OmegaConf.merge(actor_config("ppo", False), OmegaConf.create({"trust_region": override}))
    with pytest.raises(ValueError, match=message):
        TREDataParallelPPOActor(cfg, tiny_policy(), None)
