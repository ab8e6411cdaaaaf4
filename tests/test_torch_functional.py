"""Full entropy, TRE-K and TRE-P against a brute-force float64 reference written from the definition."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_tre.utils import torch_functional
from verl_tre.utils.torch_functional import (
    EntropyTerms,
    _nucleus_by_radix,
    _nucleus_by_sort,
    _Workspace,
    _shifted_exp,
    entropy_from_logits,
    entropy_terms,
    trust_region_stats,
)


def reference_region(z: torch.Tensor, top_k=None, top_p=None, max_size=None) -> list:
    """Token ids of the trust region of one row, by walking the tokens in order of probability."""
    order = torch.sort(z, descending=True, stable=True).indices.tolist()
    if top_k is not None:
        return order[:top_k]
    if top_p is None:
        return order
    probs = torch.softmax(z, dim=-1)
    region, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        region.append(token)
        mass += probs[token].item()
    return region[:max_size] if max_size is not None else region


def reference_value(z: torch.Tensor, top_k=None, top_p=None, max_size=None, scale=True) -> torch.Tensor:
    """Differentiable value of one fp64 row from the definition (the region is picked without gradient)."""
    vocab = z.shape[-1]
    if top_k == 1:
        return torch.logsumexp(z, -1) - z.max()
    region = torch.tensor(reference_region(z.detach(), top_k, top_p, max_size))
    zt = z[region]
    finite = torch.isfinite(zt)
    pi = torch.softmax(zt, -1)
    h = torch.logsumexp(zt, -1) - (pi[finite] * zt[finite]).sum()
    if top_k is None and top_p is None:
        return h
    if len(region) == 1:
        return h * 0.0
    return h * (math.log(vocab) / math.log(len(region)) if scale else 1.0)


def reference_rows(logits, **kw):
    return torch.stack([reference_value(row, **kw) for row in logits.reshape(-1, logits.shape[-1])])


METHODS = [
    pytest.param({}, id="full"),
    pytest.param({"top_k": 1}, id="k1"),
    pytest.param({"top_k": 2}, id="k2"),
    pytest.param({"top_k": 7}, id="k7"),
    pytest.param({"top_p": 0.5}, id="p0.5"),
    pytest.param({"top_p": 0.99}, id="p0.99"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kw", METHODS)
def test_values_and_gradients_match_reference(kw):
    logits = (torch.randn(6, 300, generator=_gen(0), dtype=torch.float64) * 3).requires_grad_()
    ours = entropy_from_logits(logits, **kw)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference_rows(ref_logits, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    weights = torch.rand(6, generator=_gen(1), dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kw", METHODS)
def test_gradcheck_finite_differences(kw):
    logits = (torch.randn(3, 40, generator=_gen(2), dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, **kw), (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", METHODS[2:])
def test_gradient_is_zero_outside_the_region(kw):
    logits = (torch.randn(4, 200, generator=_gen(3), dtype=torch.float64) * 3).requires_grad_()
    entropy_from_logits(logits, **kw).sum().backward()
    for row, grad in zip(logits.detach(), logits.grad):
        inside = torch.zeros(200, dtype=torch.bool)
        inside[reference_region(row, kw.get("top_k"), kw.get("top_p"))] = True
        assert torch.all(grad[~inside] == 0)


@pytest.mark.parametrize("kw", METHODS)
def test_ties_give_the_reference_value_and_split_the_gradient_evenly(kw):
    # Logits on a coarse grid: many exact ties, including at the region boundary.
    logits = (torch.randint(-4, 3, (8, 60), generator=_gen(4)).double() * 0.5).requires_grad_()
    ours = entropy_from_logits(logits, **kw)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference_rows(ref_logits, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.sum().backward()
    ref.sum().backward()
    for row, g_ours, g_ref in zip(logits.detach(), logits.grad, ref_logits.grad):
        for level in row.unique():
            tied = row == level
            # Same total over each group of tied tokens, and the same share for every member of the group.
            torch.testing.assert_close(g_ours[tied].sum(), g_ref[tied].sum(), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g_ours[tied], g_ours[tied][:1].expand(int(tied.sum())), rtol=0, atol=1e-15)


@pytest.mark.parametrize("kw", METHODS)
def test_minus_infinity_entries(kw):
    logits = torch.randn(5, 100, generator=_gen(5), dtype=torch.float64) * 2
    logits[:, 50:] = -math.inf  # half the vocabulary is impossible (masked tokens)
    logits[0, 1:50] = -math.inf  # a row with a single possible token
    logits.requires_grad_()
    ours = entropy_from_logits(logits, **kw)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = reference_rows(ref_logits, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, 50:] == 0)


def test_top_k_larger_than_the_number_of_possible_tokens():
    logits = torch.full((2, 30), -math.inf, dtype=torch.float64)
    logits[:, :3] = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    logits.requires_grad_()
    value = entropy_from_logits(logits, top_k=10)
    expected = reference_rows(logits.detach(), top_k=10)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_one_dominant_token():
    logits = torch.zeros(3, 1000, dtype=torch.float64)
    logits[:, 7] = 60.0
    logits.requires_grad_()
    terms = entropy_terms(logits, top_p=0.99)
    assert torch.all(terms.value == 0) and torch.all(terms.region_size == 1)
    terms.value.sum().backward()
    assert torch.all(logits.grad == 0)
    assert torch.all(entropy_from_logits(logits, top_k=2) > 0)


def test_flat_distribution_nucleus_spans_thousands_of_tokens():
    logits = torch.randn(3, 20000, generator=_gen(6), dtype=torch.float64) * 0.05
    terms = entropy_terms(logits, top_p=0.99)
    sizes = [len(reference_region(row, top_p=0.99)) for row in logits]
    assert min(sizes) > 19000
    assert terms.region_size.tolist() == sizes
    torch.testing.assert_close(terms.value, reference_rows(logits, top_p=0.99), rtol=1e-10, atol=1e-10)
    capped = entropy_from_logits(logits, top_p=0.99, max_region_size=256)
    torch.testing.assert_close(capped, reference_rows(logits, top_p=0.99, max_size=256), rtol=1e-10, atol=1e-10)
    # The reference's cap changes wide nuclei: the renormalized entropy drops from ~log 19,800 to ~log 256.
    unscaled = entropy_from_logits(logits, top_p=0.99, scale=False)
    unscaled_capped = entropy_from_logits(logits, top_p=0.99, max_region_size=256, scale=False)
    assert torch.all(unscaled - unscaled_capped > 4.0)


@pytest.mark.parametrize("kw", METHODS)
def test_bf16_logits_match_the_reference_on_the_same_values(kw):
    logits = (torch.randn(4, 2000, generator=_gen(7)) * 3).bfloat16().requires_grad_()
    ours = entropy_from_logits(logits, **kw)
    assert ours.dtype == torch.float32
    ref = reference_rows(logits.detach().double(), **kw)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("kw", [{}, {"top_k": 2}, {"top_p": 0.99}])
def test_full_qwen_vocabulary(kw):
    vocab = 151_936
    gen = _gen(8)
    # LLM-like rows: a few strong candidates over a long heavy tail.
    logits = torch.randn(3, vocab, generator=gen, dtype=torch.float64) * 2.5
    logits[:, :5] += torch.tensor([12.0, 11.0, 9.0, 8.0, 8.0], dtype=torch.float64)
    logits.requires_grad_()
    ours = entropy_from_logits(logits.float(), **kw)
    ref = reference_rows(logits.detach(), **kw)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-5)


def test_statistics_match_reference():
    logits = torch.randn(6, 500, generator=_gen(9), dtype=torch.float64) * 3
    stats = trust_region_stats(logits, top_p=0.9, stats_top_k=3)
    probs = torch.softmax(logits, -1)
    for i, row in enumerate(logits):
        region = reference_region(row, top_p=0.9)
        assert stats["region_size"][i].item() == len(region)
        torch.testing.assert_close(stats["region_mass"][i], probs[i, region].sum())
        torch.testing.assert_close(stats["topk_prob"][i], probs[i].topk(3).values.sum())
        torch.testing.assert_close(stats["entropy_full"][i], -(probs[i] * probs[i].log()).sum())
    assert not stats["tre_value"].requires_grad


def test_statistics_for_top_k_and_full():
    logits = torch.randn(4, 100, generator=_gen(10), dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    k = trust_region_stats(logits, top_k=4)
    torch.testing.assert_close(k["region_mass"], probs.topk(4).values.sum(-1))
    assert torch.all(k["region_size"] == 4)
    full = trust_region_stats(logits)
    torch.testing.assert_close(full["region_mass"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(full["tre_value"], full["entropy_full"])


def test_chunking_does_not_change_anything():
    logits = (torch.randn(2, 9, 70, generator=_gen(11)) * 2).requires_grad_()
    one = entropy_terms(logits, top_p=0.8, chunk_size=1)
    many = entropy_terms(logits, top_p=0.8, chunk_size=1000)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert one.value.shape == (2, 9)
    (g1,) = torch.autograd.grad(one.value.sum(), logits)
    (g2,) = torch.autograd.grad(many.value.sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_empty_input():
    logits = torch.zeros(0, 50, requires_grad=True)
    value = entropy_from_logits(logits, top_p=0.9)
    assert value.shape == (0,)
    value.sum().backward()
    assert logits.grad.shape == (0, 50)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 2, "top_p": 0.9}, "not both"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_k": 51}, "exceeds the vocabulary size 50"),
        ({"top_p": 0.0}, "open interval"),
        ({"top_p": 1.0}, "open interval"),
        ({"top_p": 1.5}, "open interval"),
        ({"top_k": 2, "max_region_size": 3}, "TRE-P nucleus only"),
        ({"top_p": 0.9, "max_region_size": 0}, "max_region_size must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        entropy_from_logits(torch.zeros(2, 50), **kwargs)


def test_bad_logits_raise_clear_errors():
    with pytest.raises(ValueError, match="floating"):
        entropy_from_logits(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[..., V\]"):
        entropy_from_logits(torch.tensor(1.0))
    with pytest.raises(ValueError, match="torch.Tensor"):
        entropy_from_logits([[0.0, 1.0]])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([-math.inf, -3.0, -1.0, 0.0, 0.0, 0.5, 2.0, 7.0]), min_size=2, max_size=12),
        min_size=1,
        max_size=4,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1 and all(max(r) > -math.inf for r in rows)),
    method=st.sampled_from([{}, {"top_k": 1}, {"top_k": 2}, {"top_p": 0.3}, {"top_p": 0.9}, {"top_p": 0.999}]),
)
def test_property_values_match_reference_and_stay_in_range(rows, method):
    logits = torch.tensor(rows, dtype=torch.float64)
    if method.get("top_k", 0) > logits.shape[-1]:
        return
    value = entropy_from_logits(logits, **method)
    torch.testing.assert_close(value, reference_rows(logits, **method), rtol=1e-9, atol=1e-9)
    assert torch.all(value >= -1e-12) and torch.all(value <= math.log(logits.shape[-1]) + 1e-9)


def test_works_under_torch_compile():
    logits = (torch.randn(5, 64, generator=_gen(12)) * 2).requires_grad_()
    compiled = torch.compile(lambda x: entropy_from_logits(x, top_p=0.9), backend="aot_eager")
    value = compiled(logits)
    torch.testing.assert_close(value, entropy_from_logits(logits, top_p=0.9))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    (expected,) = torch.autograd.grad(entropy_from_logits(logits, top_p=0.9).sum(), logits)
    torch.testing.assert_close(grad, expected)


def _fp32_rows(kind: str, vocab: int = 0) -> torch.Tensor:
    """Adversarial fp32 rows; ``vocab`` widens each row with -inf tokens (no probability) to that size."""
    rows = _adversarial_rows(kind)
    if vocab > rows.shape[-1]:
        rows = torch.cat([rows, torch.full((rows.shape[0], vocab - rows.shape[-1]), -math.inf)], dim=-1)
    return rows


def _adversarial_rows(kind: str) -> torch.Tensor:
    gen = _gen(13)
    if kind == "random":
        return torch.randn(16, 5000, generator=gen) * 3
    if kind == "flat":
        return torch.randn(4, 50000, generator=gen) * 0.01
    if kind == "ties":
        return torch.randint(-6, 3, (16, 300), generator=gen).float() * 0.25
    if kind == "minus_inf":
        z = torch.randn(8, 400, generator=gen) * 2
        z[:, 100:] = -math.inf
        return z
    if kind == "dominant":
        z = torch.randn(8, 3000, generator=gen)
        z[:, 3] = 80.0  # the rest underflow to 0 or denormal probabilities
        return z
    if kind == "wide_range":
        return torch.randn(8, 20000, generator=gen) * 15  # probabilities spanning hundreds of binades
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "flat", "ties", "minus_inf", "dominant", "wide_range"])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99, 0.999999])
def test_radix_nucleus_equals_sorted_nucleus(kind, top_p):
    z = _fp32_rows(kind)
    _, _, e = _shifted_exp(z, _Workspace(z.shape[0]))
    mass = e.double()
    target = top_p * mass.sum(dim=-1, keepdim=True)
    tau_radix, count_radix, above, n_above, n_tied = _nucleus_by_radix(e, mass, target, _Workspace(z.shape[0]))
    tau_sort, count_sort = _nucleus_by_sort(e, target)
    assert torch.equal(count_radix, count_sort)
    assert torch.equal(tau_radix, tau_sort)
    assert torch.equal(above, e > tau_sort)
    assert torch.equal(n_above, (e > tau_sort).sum(dim=-1, keepdim=True).float())
    assert torch.equal(n_tied, (e == tau_sort).sum(dim=-1, keepdim=True).float())


@pytest.mark.parametrize("kind", ["random", "flat", "ties", "minus_inf", "dominant", "wide_range"])
@pytest.mark.parametrize("method", [{"top_p": 0.5}, {"top_p": 0.99}, {"top_p": 0.999999}, {"top_p": 0.9, "max_region_size": 256}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_radix_path_equals_sort_path_in_values_statistics_and_gradients(kind, method, dtype, monkeypatch):
    # Rows of at least 2**15 tokens take the radix path; forcing the sort path on the same logits is the reference.
    logits = _fp32_rows(kind, vocab=1 << 15).to(dtype)

    def run():
        x = logits.clone().requires_grad_()
        terms = entropy_terms(x, **method, stats_top_k=3, chunk_size=5)
        (grad,) = torch.autograd.grad((terms.value * torch.linspace(0.5, 1.5, len(terms.value))).sum(), x)
        return terms, grad

    fast, fast_grad = run()
    monkeypatch.setattr(torch_functional, "_RADIX_MIN_VOCAB", 1 << 30)
    slow, slow_grad = run()
    assert torch.equal(fast.region_size, slow.region_size)
    for name in EntropyTerms._fields:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(fast_grad.float(), slow_grad.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: see README, Benchmarks)")
@pytest.mark.parametrize("method", [{}, {"top_k": 1}, {"top_k": 2}, {"top_p": 0.99}, {"top_p": 0.9, "max_region_size": 256}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu_on_a_full_vocabulary_and_adversarial_rows(method, dtype):
    gen = _gen(21)
    rows = torch.randn(6, 151_936, generator=gen) * 2.5
    rows[:, :5] += torch.tensor([12.0, 11.0, 9.0, 8.0, 8.0])
    rows[1, 1000:] = -math.inf
    rows[2] = torch.randint(-6, 3, (151_936,), generator=gen).float() * 0.25  # ties everywhere
    rows[3] *= 0.002  # a nucleus of ~150k tokens
    logits = rows.to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        x = logits.to(device).requires_grad_()
        terms = entropy_terms(x, **method, stats_top_k=3)
        (grad,) = torch.autograd.grad((terms.value * torch.arange(1.0, 7.0, device=device)).sum(), x)
        results.append(([t.cpu() for t in terms], grad.float().cpu()))
    (cpu_terms, cpu_grad), (gpu_terms, gpu_grad) = results
    assert torch.equal(cpu_terms[3], gpu_terms[3])  # region sizes
    for name, a, b in zip(EntropyTerms._fields, cpu_terms, gpu_terms):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-7)
