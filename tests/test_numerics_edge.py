"""Edge cases of the entropy terms and the Forking count: non-finite rows, the radix nucleus at bucket edges and for
tiny p (against exact rational arithmetic), double backward, torch.compile over changing row counts."""

import math
from fractions import Fraction

import pytest
import torch

from verl_tre.utils.torch_functional import (
    EntropyTerms,
    _nucleus_by_radix,
    _nucleus_by_sort,
    _Workspace,
    entropy_from_logits,
    entropy_terms,
)

RADIX_VOCAB = 1 << 15  # rows this wide take the radix nucleus search (fp32)

MODES = [
    pytest.param({}, id="full"),
    pytest.param({"top_k": 1}, id="k1"),
    pytest.param({"top_k": 3}, id="k3"),
    pytest.param({"top_p": 0.9}, id="p0.9"),
    pytest.param({"top_p": 0.5, "max_region_size": 4}, id="p0.5cap4"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows_with_non_finite(vocab: int) -> tuple:
    """(logits [7, vocab] fp32, bad row mask [7]): rows 1-3 and 5 are non-finite in the four ways there are."""
    z = torch.randn(7, vocab, generator=_gen(3)) * 2
    z[1, 7] = math.nan
    z[2, 11] = math.inf
    z[3] = -math.inf
    z[4, vocab // 2 :] = -math.inf  # finite: tokens without probability
    z[5, 3], z[5, 9] = math.inf, math.nan
    z[6, :2] = -math.inf
    return z, torch.tensor([False, True, True, True, False, True, False])


@pytest.mark.parametrize("with_stats", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [300, RADIX_VOCAB], ids=["sort", "radix"])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_rows_give_nan_for_that_row_only(mode, vocab, dtype, with_stats):
    z, bad = _rows_with_non_finite(vocab)
    x = z.to(dtype).requires_grad_()
    weights = torch.linspace(0.5, 1.5, 7)
    terms = entropy_terms(x, **mode, stats_top_k=2, with_stats=with_stats, chunk_size=3)
    (grad,) = torch.autograd.grad(terms.value, x, grad_outputs=weights)

    good = z[~bad].to(dtype).requires_grad_()
    alone = entropy_terms(good, **mode, stats_top_k=2, with_stats=with_stats, chunk_size=3)
    (alone_grad,) = torch.autograd.grad(alone.value, good, grad_outputs=weights[~bad])
    for name in EntropyTerms._fields:
        column = getattr(terms, name)
        assert torch.isnan(column[bad]).all(), name
        torch.testing.assert_close(column[~bad], getattr(alone, name), rtol=0, atol=0, msg=name)
    assert torch.isnan(grad[bad].float()).all()
    torch.testing.assert_close(grad[~bad], alone_grad, rtol=0, atol=0)


def _edge_rows(seed: int) -> torch.Tensor:
    """One fp32 probability row built so that the mass above the boundary bucket is exact in fp64 while the total
    is not: four dyadic top tokens (mass 1.875 above the bucket of 2**-5), 40 tokens inside that one 15-bit bucket
    (2**-5 (1 + j 2**-18), dyadic, exact sums), and a tail of 100,000 random values in [1e-9, 1e-4] whose sums
    round (with these seeds the old total-minus-prefix masses were off by enough to move the boundary)."""
    top = torch.tensor([1.0, 0.5, 0.25, 0.125])
    bucket = 2.0**-5 * (1 + torch.arange(40, dtype=torch.float64) * 2.0**-18)
    tail = torch.empty(100_000, dtype=torch.float64).uniform_(1e-9, 1e-4, generator=_gen(seed))
    row = torch.cat([top.double(), bucket, tail]).float()
    return row[torch.randperm(row.numel(), generator=_gen(seed + 1))]


def _exact_count(ordered: list, target: float) -> int:
    """Tokens whose preceding mass (``ordered``: the row's fp32 values in descending order, as far as the boundary
    can reach) is below ``target``, in exact rationals."""
    mass, count, bound = Fraction(0), 0, Fraction(target)
    for value in ordered:
        if mass >= bound:
            break
        mass += Fraction(value)
        count += 1
    return count


@pytest.mark.parametrize("seed", [0, 2])
def test_radix_nucleus_at_bucket_edges_equals_exact_rational_arithmetic(seed):
    e = _edge_rows(seed)
    ordered = torch.sort(e.double(), descending=True).values[:44].tolist()
    # Edges: the mass above each of the top tokens and of the first tokens of the bucket, each +-6 fp64 ulps.
    edges, mass = [], Fraction(0)
    for value in ordered[:12]:
        mass += Fraction(value)
        edges.append(float(mass))
    targets = []
    for edge in edges:
        below = above = edge
        targets.append(edge)
        for _ in range(6):
            below, above = math.nextafter(below, 0.0), math.nextafter(above, 4.0)
            targets += [below, above]
    rows = e.expand(len(targets), -1).contiguous()
    target = torch.tensor(targets, dtype=torch.float64).unsqueeze(-1)
    tau, count, above, n_above, n_tied = _nucleus_by_radix(rows, rows.double(), target, _Workspace(len(targets)))
    expected = [_exact_count(ordered, t) for t in targets]
    assert count.squeeze(-1).tolist() == expected
    assert tau.squeeze(-1).tolist() == [ordered[c - 1] for c in expected]
    sort_tau, sort_count = _nucleus_by_sort(rows, target)
    assert torch.equal(sort_count, count) and torch.equal(sort_tau, tau)


@pytest.mark.parametrize("top_p", [1e-12, 1e-16, 1e-20, 1e-300, 5e-324])
@pytest.mark.parametrize("vocab", [300, RADIX_VOCAB], ids=["sort", "radix"])
def test_tiny_p_gives_the_top_token_alone(top_p, vocab):
    z = (torch.randn(6, vocab, generator=_gen(8)) * 3).requires_grad_()
    terms = entropy_terms(z, top_p=top_p, chunk_size=4)
    (grad,) = torch.autograd.grad(terms.value.sum(), z)
    assert terms.region_size.tolist() == [1.0] * 6
    assert terms.value.tolist() == [0.0] * 6
    torch.testing.assert_close(terms.region_mass, torch.softmax(z.detach(), -1).amax(-1), rtol=1e-5, atol=0)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", MODES)
def test_double_backward_raises_a_clear_error(mode):
    z = torch.randn(3, 50, generator=_gen(9), dtype=torch.float64).requires_grad_()
    value = entropy_from_logits(z, **mode)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(value.sum(), z, create_graph=True)
    # First-order gradients keep working.
    (grad,) = torch.autograd.grad(entropy_from_logits(z, **mode).sum(), z)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", [pytest.param({"top_p": 0.9}, id="p0.9"), pytest.param({"top_k": 2}, id="k2")])
def test_torch_compile_does_not_recompile_for_new_row_counts(mode):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda x: entropy_from_logits(x, **mode) * 2.0, backend=counter)
    for rows in (3, 5, 8, 13, 21, 34, 55, 89, 144, 233):
        x = (torch.randn(rows, 64, generator=_gen(rows)) * 2).requires_grad_()
        value = compiled(x)
        torch.testing.assert_close(value, entropy_from_logits(x.detach(), **mode) * 2.0)
        (grad,) = torch.autograd.grad(value.sum(), x)
        (expected,) = torch.autograd.grad((entropy_from_logits(x, **mode) * 2.0).sum(), x)
        torch.testing.assert_close(grad, expected)
    assert counter.frame_count <= 2


# ---- Forking Tokens: how many tokens are kept ----

from verl_tre.trainer.ppo.core_algos import forking_count, forking_mini_batch_mask, forking_token_mask  # noqa: E402


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.15, 0.2])
def test_forking_keeps_exactly_ceil_ratio_times_n_in_both_scopes(ratio):
    exact = Fraction(str(ratio))
    scores = torch.rand(2000, generator=_gen(10))
    for n in range(1, 2001):
        expected = max(1, math.ceil(exact * n))
        assert forking_count(n, ratio) == expected, n
        entropy, mask = scores[:n].view(1, n), torch.ones(1, n, dtype=torch.long)
        micro = forking_token_mask(entropy, mask, ratio)
        mini, threshold = forking_mini_batch_mask(entropy, mask, ratio)
        assert int(micro.sum()) == expected, n
        assert torch.equal(mini, micro), n
        assert float(threshold) == float(entropy[micro].min())


def test_forking_mini_batch_scope_keeps_exactly_the_count_on_ties_like_the_micro_batch_scope():
    entropy = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    keep, threshold = forking_mini_batch_mask(entropy, mask, 0.2)  # 9 valid tokens -> 2, among 8 tied at 1.0
    assert int(keep.sum()) == 2 and float(threshold) == 1.0
    assert torch.equal(keep, forking_token_mask(entropy, mask, 0.2))
    assert keep[0, 1:3].all()  # ties go to the earliest positions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an index out of range is a device-side assert there)")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_non_finite_rows_equal_cpu(mode):
    z, bad = _rows_with_non_finite(151_936)
    results = []
    for device in ("cpu", "cuda"):
        x = z.to(device).requires_grad_()
        terms = entropy_terms(x, **mode, stats_top_k=2)
        (grad,) = torch.autograd.grad(terms.value, x, grad_outputs=torch.linspace(0.5, 1.5, 7, device=device))
        torch.cuda.synchronize()
        results.append(([t.cpu() for t in terms], grad.cpu()))
    (cpu_terms, cpu_grad), (gpu_terms, gpu_grad) = results
    for name, a, b in zip(EntropyTerms._fields, cpu_terms, gpu_terms):
        assert torch.isnan(b[bad]).all(), name
        torch.testing.assert_close(b[~bad], a[~bad], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.isnan(gpu_grad[bad]).all()
    torch.testing.assert_close(gpu_grad[~bad], cpu_grad[~bad], rtol=1e-4, atol=1e-7)
