"""fused_linear_entropy_terms against the unfused computation: lm_head matmul, log_softmax and entropy_terms on
materialized logits. Every field of EntropyTerms is compared (iterating its _fields), plus the log-probs and the
gradients of the hidden states and the weight."""

import pytest
import torch
from test_torch_functional import METHODS as ENTROPY_METHODS
from torch.utils._python_dispatch import TorchDispatchMode

import verl_tre.utils.torch_functional as tf
from verl_tre.utils.torch_functional import EntropyTerms, entropy_terms, fused_linear_entropy_terms

# entropy_terms' modes, plus a capped nucleus and an unscaled TRE-K.
METHODS = ENTROPY_METHODS + [
    pytest.param({"top_p": 0.9, "max_region_size": 3}, id="p0.9cap3"),
    pytest.param({"top_k": 3, "scale": False}, id="k3unscaled"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def unfused(hidden, weight, labels, temperature, grads, **kw):
    """Reference: materialized logits in the inputs' dtype, log-probs in fp32/fp64, entropy_terms; backward of
    sum(g_lp * log_probs + g_v * value). Returns (log_probs, terms, grad_hidden, grad_weight)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logits = h @ w.T / temperature
    work = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(work), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    terms = entropy_terms(logits, **kw)
    _backward(log_probs, terms.value, grads)
    return log_probs, terms, h.grad, w.grad


def fused(hidden, weight, labels, temperature, grads, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    log_probs, terms = fused_linear_entropy_terms(h, w, labels, temperature=temperature, **kw)
    _backward(log_probs, terms.value, grads)
    return log_probs, terms, h.grad, w.grad


def _backward(log_probs, value, grads):
    g_lp, g_v = grads
    loss = 0.0
    if g_lp is not None:
        loss = loss + (log_probs * g_lp.to(log_probs.dtype)).sum()
    if g_v is not None:
        loss = loss + (value * g_v.to(value.dtype)).sum()
    loss.backward()


def assert_same(ours, ref, atol, rtol=0.0, grad_rtol=None, equal_nan=False):
    lp, terms, gh, gw = ours
    rlp, rterms, rgh, rgw = ref
    assert isinstance(terms, EntropyTerms)
    for name in EntropyTerms._fields:
        a, b = getattr(terms, name), getattr(rterms, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(lp, rlp.to(lp.dtype), atol=atol, rtol=rtol, msg=lambda m: f"log_probs: {m}")
    for name, a, b in (("grad hidden", gh, rgh), ("grad weight", gw, rgw)):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a.dtype == b.dtype, name
        tol = atol if grad_rtol is None else grad_rtol * b.float().abs().nan_to_num(posinf=0, neginf=0).max().item()
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")


def random_inputs(n, h, v, dtype, seed=0, scale=2.0):
    gen = _gen(seed)
    hidden = (torch.randn(n, h, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    grads = (torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64))
    return hidden, weight, labels, grads


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kw", METHODS)
def test_fp64_equals_unfused_exactly(kw, chunk_size):
    hidden, weight, labels, grads = random_inputs(23, 12, 97, torch.float64)
    stats = dict(stats_top_k=3, reference_top_k=(2, 10), reference_top_p=0.9)
    ours = fused(hidden, weight, labels, 0.7, grads, chunk_size=chunk_size, **stats, **kw)
    ref = unfused(hidden, weight, labels, 0.7, grads, **stats, **kw)
    assert_same(ours, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw", METHODS)
def test_fp32_equals_unfused(kw):
    hidden, weight, labels, grads = random_inputs(29, 16, 301, torch.float32, seed=3)
    ours = fused(hidden, weight, labels, 1.3, grads, chunk_size=6, **kw)
    ref = unfused(hidden, weight, labels, 1.3, grads, **kw)
    assert_same(ours, ref, atol=2e-5, rtol=1e-5, grad_rtol=2e-5)


@pytest.mark.parametrize("kw", METHODS)
def test_bf16_equals_unfused_on_the_same_logits(kw):
    """bf16 inputs: the fused chunks compute the same bf16 logits as the unfused matmul, so values, statistics and
    log-probs agree to fp32 rounding; gradients are rounded to bf16 at the same places (fp32 accumulation)."""
    hidden, weight, labels, grads = random_inputs(31, 16, 257, torch.bfloat16, seed=5)
    ours = fused(hidden, weight, labels, 0.6, grads, chunk_size=5, **kw)
    ref = unfused(hidden, weight, labels, 0.6, grads, **kw)
    assert_same(ours, ref, atol=1e-5, rtol=1e-5, grad_rtol=2e-2)


def test_bf16_weight_gradient_is_accumulated_in_fp32():
    """Many chunks: the fused weight gradient stays as close to the fp64 truth as the unchunked bf16 matmul's,
    which a bf16 running sum over 64 one-row chunks would not."""
    hidden, weight, labels, grads = random_inputs(64, 16, 257, torch.bfloat16, seed=6)
    ours = fused(hidden, weight, labels, 1.0, grads, chunk_size=1)
    ref = unfused(hidden, weight, labels, 1.0, grads)
    truth = unfused(hidden.double(), weight.double(), labels, 1.0, grads)
    err_ours = (ours[3].double() - truth[3]).abs().max()
    err_ref = (ref[3].double() - truth[3]).abs().max()
    assert err_ours <= 1.5 * err_ref + 1e-6


def adversarial(kind, dtype):
    """Integer-valued hidden states and weights (exact logits in every dtype) shaped into one kind of hard row."""
    gen = _gen(11)
    n, h, v = 19, 6, 150
    hidden = torch.randint(-2, 3, (n, h), generator=gen).double()
    weight = torch.randint(-2, 3, (v, h), generator=gen).double()
    hidden[:, 0] = 1.0  # a bias feature: weight[:, 0] is a per-token bias
    weight[:, 0] = 0.0
    labels = torch.randint(0, v, (n,), generator=gen)
    if kind == "ties":
        weight[v // 2 :] = weight[: v - v // 2]  # every logit appears twice: ties at every region boundary
        weight[:, 1:] = weight[:, 1:].clamp(-1, 1)
    elif kind == "dominant":
        weight[7, 0] = 40.0  # one token takes all the mass: one-token nuclei
    elif kind == "wide":
        weight[:, 1:] = 0.0  # uniform rows: the nucleus spans nearly the whole vocabulary
        weight[:3, 0] = 1.0
    elif kind in ("neg_inf", "huge_negative"):
        bias = -float("inf") if kind == "neg_inf" else -1e30
        weight[::3, 0] = bias  # a third of the vocabulary is masked
        labels = (labels // 3) * 3 + 1  # labels on unmasked tokens
    gen_g = _gen(12)
    grads = (torch.randn(n, generator=gen_g, dtype=torch.float64), torch.randn(n, generator=gen_g, dtype=torch.float64))
    return hidden.to(dtype), weight.to(dtype), labels, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ties", "dominant", "wide", "huge_negative", "neg_inf"])
@pytest.mark.parametrize("kw", METHODS)
def test_adversarial_rows_equal_unfused(kw, kind, dtype):
    hidden, weight, labels, grads = adversarial(kind, dtype)
    ours = fused(hidden, weight, labels, 1.0, grads, chunk_size=4, stats_top_k=2, **kw)
    ref = unfused(hidden, weight, labels, 1.0, grads, stats_top_k=2, **kw)
    for t in (*ours[1], ours[0]):
        assert torch.isfinite(t).all()
    # A -inf weight entry makes d/dh = grad @ W NaN in both paths (0 * -inf); the weight's gradient stays finite.
    assert_same(ours, ref, atol=1e-5, rtol=1e-5, grad_rtol=2e-5 if dtype == torch.float32 else 2e-2,
                equal_nan=kind == "neg_inf")
    if kind == "neg_inf":
        assert torch.isfinite(ours[3]).all()


@pytest.mark.parametrize("which", ["log_probs", "value", "both"])
@pytest.mark.parametrize("kw", [pytest.param({}, id="full"), pytest.param({"top_p": 0.8}, id="p0.8")])
def test_gradient_through_one_output_only(kw, which):
    hidden, weight, labels, (g_lp, g_v) = random_inputs(17, 8, 120, torch.float64, seed=7)
    grads = (g_lp if which != "value" else None, g_v if which != "log_probs" else None)
    ours = fused(hidden, weight, labels, 0.9, grads, chunk_size=5, **kw)
    ref = unfused(hidden, weight, labels, 0.9, grads, **kw)
    assert_same(ours, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw", [pytest.param({}, id="full"), pytest.param({"top_k": 3}, id="k3"), pytest.param({"top_p": 0.7}, id="p0.7")])
def test_gradcheck(kw):
    hidden, weight, labels, _ = random_inputs(5, 3, 16, torch.float64, seed=8)
    hidden.requires_grad_()
    weight.requires_grad_()

    def f(h, w):
        lp, terms = fused_linear_entropy_terms(h, w, labels, temperature=0.8, chunk_size=3, **kw)
        return lp, terms.value

    assert torch.autograd.gradcheck(f, (hidden, weight))


@pytest.mark.parametrize("through", ["log_probs", "value"])
def test_double_backward_raises_a_clear_error(through):
    """Not torch's opaque "mm(): functions with out=... arguments don't support automatic differentiation"."""
    h = torch.randn(5, 8, generator=_gen(21), dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=_gen(22), dtype=torch.float64, requires_grad=True)
    log_probs, terms = fused_linear_entropy_terms(h, w, torch.arange(5), top_p=0.9)
    out = log_probs if through == "log_probs" else terms.value
    with pytest.raises(RuntimeError, match="fused_linear_entropy_terms: double backward is not supported"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


def test_weight_only_and_hidden_only_gradients():
    hidden, weight, labels, grads = random_inputs(9, 6, 50, torch.float64, seed=9)
    ref = unfused(hidden, weight, labels, 1.0, grads, top_k=2)
    w = weight.clone().requires_grad_()
    lp, terms = fused_linear_entropy_terms(hidden, w, labels, top_k=2, chunk_size=4)
    _backward(lp, terms.value, grads)
    torch.testing.assert_close(w.grad, ref[3])
    h = hidden.clone().requires_grad_()
    lp, terms = fused_linear_entropy_terms(h, weight, labels, top_k=2, chunk_size=4)
    _backward(lp, terms.value, grads)
    torch.testing.assert_close(h.grad, ref[2])


def test_without_stats_and_no_grad():
    hidden, weight, labels, _ = random_inputs(11, 6, 60, torch.float32)
    with torch.no_grad():
        lp, terms = fused_linear_entropy_terms(hidden, weight, labels, top_p=0.9, with_stats=False, chunk_size=4)
    ref = entropy_terms(hidden @ weight.T, top_p=0.9, with_stats=False)
    for name in EntropyTerms._fields:
        torch.testing.assert_close(getattr(terms, name), getattr(ref, name), atol=1e-6, rtol=1e-6)
    assert not lp.requires_grad and not terms.value.requires_grad


def test_empty_input():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    lp, terms = fused_linear_entropy_terms(hidden, weight, torch.zeros(0, dtype=torch.long), top_k=2,
                                           reference_top_k=(2, 3))
    expected = entropy_terms(torch.zeros(0, 10), top_k=2, reference_top_k=(2, 3))
    assert lp.shape == (0,) and [t.shape for t in terms] == [t.shape for t in expected]
    assert terms.tail_mass.shape == (0, 2)
    (lp.sum() + terms.value.sum()).backward()
    assert hidden.grad.shape == (0, 4) and not weight.grad.any()


class _Recorder(TorchDispatchMode):
    """Records the largest tensor any op produces and whether anything synchronizes with the host."""

    def __init__(self):
        super().__init__()
        self.largest, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(func)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", METHODS)
def test_no_logits_sized_tensor_and_no_host_sync(kw, dtype):
    n, h, v, chunk = 96, 8, 400, 8
    hidden, weight, labels, grads = random_inputs(n, h, v, dtype, seed=10)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _Recorder() as rec:
        lp, terms = fused_linear_entropy_terms(hidden, weight, labels, chunk_size=chunk, **kw)
        _backward(lp, terms.value, grads)
    assert rec.syncs == []
    # Chunks are [8, V]; the weight and its fp32 gradient accumulator are [V, H]; logits would be [96, V].
    assert rec.largest <= max(chunk * v, v * h), rec.largest
    assert rec.largest * 4 < n * v


def _live_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes while fn() runs, above those live before it (torch.profiler's allocation and
    free events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("kw", [pytest.param({}, id="full"), pytest.param({"top_p": 0.99}, id="p0.99")])
def test_live_memory_is_one_chunk_and_flat_in_n(kw):
    """Forward + backward hold one [chunk, V] buffer (backward writes the gradient over the recomputed logits) plus
    the entropy's sub-chunk workspace, whatever N: measured as live tensor bytes above the inputs and gradients."""
    v, h = 40_000, 8  # V above the radix threshold, so TRE-P takes the production path
    sub = tf._chunk_rows(v, torch.device("cpu"), None)
    chunk = 8 * sub

    def peak(n):
        hidden, weight, labels, grads = random_inputs(n, h, v, torch.float32, seed=12)
        hidden.requires_grad_()
        weight.requires_grad_()
        grads_bytes = (hidden.numel() + weight.numel()) * 4

        def step():
            lp, terms = fused_linear_entropy_terms(hidden, weight, labels, chunk_size=chunk, **kw)
            _backward(lp, terms.value, grads)

        return _live_peak_bytes(step) - grads_bytes

    small, large = peak(2 * chunk), peak(8 * chunk)
    assert large <= small * 1.02, (small, large)
    if not kw:
        # Full entropy: the chunk (4 bytes per logit) and a 16-byte-per-logit sub-chunk workspace at most. A second
        # [chunk, V] buffer for the gradient would add 4 * chunk * V = twice the workspace.
        assert large <= 4 * chunk * v + 16 * sub * v + 2**20, (large, chunk, sub)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": 2.5},
        {"top_k": 1000},
        {"top_p": 1.0},
        {"top_p": 0.0},
        {"top_k": 2, "top_p": 0.5},
        {"max_region_size": 4},
        {"top_p": 0.5, "max_region_size": 0},
        {"scale": 1},
        {"stats_top_k": 0},
        {"chunk_size": 0},
    ],
)
def test_same_errors_as_entropy_terms(kwargs):
    hidden, weight, labels, _ = random_inputs(4, 3, 20, torch.float32)
    with pytest.raises(ValueError) as expected:
        entropy_terms(hidden @ weight.T, **kwargs)
    with pytest.raises(ValueError) as got:
        fused_linear_entropy_terms(hidden, weight, labels, **kwargs)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, l: (h[0], w, l), "hidden_states must be a floating \\[N, H\\]"),
        (lambda h, w, l: (h.long(), w, l), "hidden_states must be a floating"),
        (lambda h, w, l: (h, w[:, :2], l), "weight must be the lm_head's \\[V, H\\]"),
        (lambda h, w, l: (h, w.double(), l), "same dtype"),
        (lambda h, w, l: (h, w, l.int()), "labels must be an int64 \\[N\\]"),
        (lambda h, w, l: (h, w, l[:2]), "labels must be an int64 \\[N\\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    hidden, weight, labels, _ = random_inputs(4, 3, 20, torch.float32)
    with pytest.raises(ValueError, match=message):
        fused_linear_entropy_terms(*change(hidden, weight, labels))


@pytest.mark.parametrize("temperature", [0, -1.0, True, "1"])
def test_bad_temperature(temperature):
    hidden, weight, labels, _ = random_inputs(4, 3, 20, torch.float32)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        fused_linear_entropy_terms(hidden, weight, labels, temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", METHODS)
def test_cuda_bf16_equals_unfused(kw):
    hidden, weight, labels, grads = random_inputs(300, 64, 151_936 // 8, torch.bfloat16, seed=13)
    cuda = [t.cuda() for t in (hidden, weight, labels)]
    g = tuple(x.cuda() for x in grads)
    ours = fused(*cuda, 0.7, g, chunk_size=128, **kw)
    ref = unfused(*cuda, 0.7, g, **kw)
    assert_same(ours, ref, atol=1e-4, rtol=1e-4, grad_rtol=2e-2)
