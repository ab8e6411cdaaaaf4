"""Entropy of the policy over the whole vocabulary or over a trust region of it (TRE-K, TRE-P).

For one position with logits z (already divided by the rollout temperature) over a vocabulary of V tokens and a
trust region T, let pi_T be the softmax renormalized over T. The trust-region entropy is

    H_T(z) = logsumexp(z_T) - sum_{a in T} pi_T(a) z_a.

* full entropy:  T is the whole vocabulary, no scaling.
* TRE-K:        T is the K largest logits; the value is H_T * log(V) / log(K), so that it lies in [0, log V] like
                the full entropy and one coefficient means the same for every method. K = 1 gives the
                min-entropy logsumexp(z) - max(z) instead (a renormalized top-1 has no entropy).
* TRE-P:        T is the nucleus of mass p: a token is in T iff the probability of the tokens ranked before it is
                below p (so the top token and the token that crosses p are in). The value is
                H_T * log(V) / log(|T|), and 0 where |T| = 1. The nucleus is computed with fp64 sums of the fp32
                probabilities from the most likely token down (exactly 0 before the top token, so any p > 0 keeps
                at least the top token); ``max_region_size`` caps it only when asked (the reference capped it at
                256 tokens, which changes wide nuclei; its selection sums in fp32, so sizes can still differ).

The region is chosen without gradient; the gradient flows through the logits inside T only (through all logits
for K = 1, whose value contains the full logsumexp). Where tokens tied at the region's boundary are only partly
inside it, the value is the same whichever of them are taken, and each tied token receives the same share of the
gradient (the mean over the possible tie-breaks). Double backward is not supported (a clear error).

Non-finite rows (a NaN or +inf logit, or only -inf logits): every output of the row is NaN, in every mode, and so
is its gradient; the other rows are computed exactly as without it, every index stays in range, and nothing
synchronizes with the host. Under torch.compile the terms run eagerly (one graph break, no recompilation when the
row count changes).

Memory: rows are processed in chunks through reused workspace buffers, so fp32 temporaries never exceed
``chunk_size`` rows of the vocabulary; the backward pass recomputes what it needs from the logits and a few
numbers per row instead of keeping [N, V] activations. Nothing here synchronizes the host with the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "TrustRegion",
    "EntropyTerms",
    "entropy_from_logits",
    "trust_region_stats",
    "entropy_terms",
    "fused_linear_entropy_terms",
    "mass_outside",
]

Mode = Literal["full", "top_k", "top_p"]

# Elements of one chunk's [rows, V] workspace buffers (about 29 bytes per element in all for TRE-P). On CPU 2**20
# keeps the working set near the L3 cache and measured fastest (2**19 to 2**22 tried at V = 151,936); on a GPU a
# larger chunk amortizes kernel launches while the workspace stays near 0.5 GiB at any N.
_CHUNK_ELEMENTS = {"cpu": 2**20}
_CHUNK_ELEMENTS_ACCELERATOR = 2**24
# Radix selection of the nucleus pays off once V outgrows its 2**15 buckets per row; below that a sort is cheaper.
_RADIX_MIN_VOCAB = 1 << 15
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TrustRegion:
    """Which entropy to compute and how.

    mode: "full" (whole vocabulary), "top_k" (TRE-K) or "top_p" (TRE-P).
    top_k: K for "top_k", an integer >= 1.
    top_p: p for "top_p", in the open interval (0, 1).
    max_size: optional cap on the TRE-P region size (the reference capped at 256; its fp32 cumulative sum still
        differs from our fp64 one on rare rows); None computes the uncapped nucleus.
    scale: multiply by log(V) / log(|T|) (the reference does); False gives the plain renormalized entropy, useful
        to compare regularizers at equal effective strength (TRE-K with K = 1 is logsumexp(z) - max(z) either way).
    """

    mode: Mode = "full"
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_size: Optional[int] = None
    scale: bool = True

    @classmethod
    def from_args(cls, top_k=None, top_p=None, max_region_size=None, scale=True) -> "TrustRegion":
        """Builds and validates a region from the keyword arguments of the public functions."""
        if top_k is not None and top_p is not None:
            raise ValueError(f"give top_k (TRE-K) or top_p (TRE-P), not both (got top_k={top_k}, top_p={top_p})")
        mode = "top_k" if top_k is not None else "top_p" if top_p is not None else "full"
        region = cls(mode=mode, top_k=top_k, top_p=top_p, max_size=max_region_size, scale=scale)
        region.validate()
        return region

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Raises ValueError naming the bad option and what is allowed."""
        if self.mode not in ("full", "top_k", "top_p"):
            raise ValueError(f"trust region mode must be 'full', 'top_k' or 'top_p', got {self.mode!r}")
        if self.mode == "top_k":
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
            if vocab_size is not None and self.top_k > vocab_size:
                raise ValueError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}; use 1 <= top_k <= V")
        if self.mode == "top_p":
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p < 1.0:
                raise ValueError(f"top_p must be a number in the open interval (0, 1), got {self.top_p!r}")
        if self.max_size is not None:
            if self.mode != "top_p":
                raise ValueError("max_region_size caps the TRE-P nucleus only; leave it unset for full entropy and TRE-K")
            if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 1:
                raise ValueError(f"max_region_size must be an integer >= 1 or None, got {self.max_size!r}")
        if not isinstance(self.scale, bool):
            raise ValueError(f"scale must be True or False, got {self.scale!r}")


class EntropyTerms(NamedTuple):
    """Per-position outputs of one pass over the logits; every tensor has the logits' leading shape, in fp32
    (fp64 for fp64 logits).

    value: the regularizer (full entropy, TRE-K or TRE-P), differentiable w.r.t. the logits.
    entropy_full: entropy of the full softmax, nats (detached).
    region_mass: probability of the trust region under the full softmax, in [0, 1] (detached).
    region_size: number of tokens in the trust region (detached, fp32 holding integers).
    topk_prob: probability of the ``stats_top_k`` most likely tokens under the full softmax (detached).

    Reference statistics, the same whichever regularizer ``value`` is (0 where not computed: ``with_stats`` off, or
    no reference region asked for):
    top1_prob: probability of the most likely token.
    tail_mass: [..., len(reference_top_k)] probability outside the K most likely tokens, one column per reference
        K (0 where K >= V); fp32 sums make its absolute error ~1e-7.
    nucleus_size: tokens in the ``reference_top_p`` nucleus (TRE-P's exact definition, uncapped).
    """

    value: torch.Tensor
    entropy_full: torch.Tensor
    region_mass: torch.Tensor
    region_size: torch.Tensor
    topk_prob: torch.Tensor
    top1_prob: Optional[torch.Tensor] = None
    tail_mass: Optional[torch.Tensor] = None
    nucleus_size: Optional[torch.Tensor] = None


class _Reference(NamedTuple):
    """The fixed regions of the reference statistics: Ks of the tail masses, p of the nucleus (None: skipped)."""

    top_ks: tuple = ()
    top_p: Optional[float] = None

    @classmethod
    def from_args(cls, top_ks, top_p) -> "_Reference":
        top_ks = tuple(top_ks or ())
        for k in top_ks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"reference_top_k must be a list of integers >= 1, got {list(top_ks)!r}")
        if top_p is not None:
            TrustRegion(mode="top_p", top_p=top_p).validate()
        return cls(top_ks, None if top_p is None else float(top_p))


_NO_REFERENCE = _Reference()


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be a floating tensor (fp16, bf16, fp32 or fp64), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")


class _Workspace:
    """Named [rows, V] buffers reused by every chunk of one pass. On CPU a large allocation is fresh pages from
    the operating system each time, which costs more than the arithmetic on them; on GPU it saves allocator work.
    ``ws(name, like, dtype)`` returns a buffer shaped like ``like`` (a chunk, possibly the shorter last one)."""

    def __init__(self, rows: int):
        self._rows = rows
        self._buffers: dict = {}

    def __call__(self, name: str, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = like.dtype if dtype is None else dtype
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(self._rows, like.shape[-1], dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[: like.shape[0]]


def _shifted_exp(z: torch.Tensor, ws: _Workspace):
    """(row_max [c, 1], shifted [c, V], e [c, V]) with shifted = z - row_max, and e = exp(shifted) in [0, 1].

    -inf logits become the dtype's lowest finite value in ``shifted`` so that e * shifted is 0 there, not NaN; e is
    0 for them either way. A non-finite row (a NaN or +inf logit, or every logit -inf; row_max is then not finite)
    gets NaN -> 0 and +inf -> 0 in ``shifted``: its e stays a valid row in [0, 1] with maximum 1, so that the
    region search indexes in range; callers replace its outputs by NaN (see _non_finite_rows).
    """
    row_max = z.amax(dim=-1, keepdim=True)
    shifted = torch.sub(z, row_max, out=ws("shifted", z))
    # One pass, as fast as the clamp it replaces on CPU (measured); finite rows only meet the -inf case.
    torch.nan_to_num_(shifted, nan=0.0, posinf=0.0, neginf=torch.finfo(z.dtype).min)
    return row_max, shifted, torch.exp(shifted, out=ws("e", z))


def _non_finite_rows(row_max: torch.Tensor) -> torch.Tensor:
    """[c, 1] bool: rows with a NaN or +inf logit, or only -inf logits. amax propagates NaN, so row_max is
    NaN, +inf or -inf exactly for them."""
    return ~torch.isfinite(row_max)


def _nan_where(bad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(bad, torch.full_like(t, math.nan), t)


def _dot(a: torch.Tensor, b: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """[c, 1] row-wise sum of a * b, through a workspace buffer."""
    return torch.mul(a, b, out=ws("product", a)).sum(dim=-1, keepdim=True)


def _count(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[c, 1] number of True entries per row, as ``dtype`` (exact below 2**24 for fp32). Summing the mask's bytes
    is several times faster on CPU than summing booleans, which goes through an int64 copy."""
    return mask.view(torch.uint8).sum(dim=-1, keepdim=True, dtype=dtype)


class _Nucleus(NamedTuple):
    """TRE-P region of a chunk in probability space; every tensor but ``above`` is [c, 1] in e's dtype.

    tau: probability (unnormalized, e) of the last token in. size: tokens in the region. above: [c, V] mask of
    e > tau. n_above / n_tied: tokens with e > tau / e == tau (the region takes size - n_above of the tied ones).
    """

    tau: torch.Tensor
    size: torch.Tensor
    above: torch.Tensor
    n_above: torch.Tensor
    n_tied: torch.Tensor


def _nucleus_by_sort(e: torch.Tensor, target: torch.Tensor):
    """Nucleus boundary by a full sort (any dtype; used for fp64 and small vocabularies).

    e: [c, V] >= 0; target: [c, 1] fp64 mass. Returns (tau [c, 1], count [c, 1] long): the count of tokens whose
    preceding mass is below target, and the value of the last of them.
    """
    ordered = torch.sort(e, dim=-1, descending=True).values
    # Exclusive prefix sums without a subtraction: exactly 0 before the top token, as the radix search's suffix sums.
    before = torch.zeros(ordered.shape, dtype=torch.float64, device=e.device)
    torch.cumsum(ordered[:, :-1], dim=-1, dtype=torch.float64, out=before[:, 1:])
    # target > 0 and before[0] = 0 give count >= 1; the clamp keeps the gather in range whatever the input.
    count = (before < target).sum(dim=-1, keepdim=True).clamp_(min=1)
    return torch.gather(ordered, -1, count - 1), count


class _MassAbove(NamedTuple):
    """Mass strictly above each bucket of a [c, B] fp64 histogram, plus a [c, 1] ``base`` (the mass above the whole
    histogram), measured from the top: top[:, j] = base + the mass of the j + 1 highest buckets (a cumulative sum over
    the buckets in descending order), so the mass above bucket b is top[:, B - 2 - b], and exactly base above the
    highest non-empty bucket (a total minus a prefix sum would leave rounding there). Non-increasing in b, since
    fp64 rounding is monotone; kept in descending order to save flips."""

    top: torch.Tensor
    base: torch.Tensor

    @classmethod
    def of(cls, hist: torch.Tensor, base: Optional[torch.Tensor] = None) -> "_MassAbove":
        top = hist.flip(-1).cumsum_(dim=-1)
        if base is None:
            return cls(top, torch.zeros_like(top[:, :1]))
        return cls(top.add_(base), base)

    def count_at_least(self, target: torch.Tensor) -> torch.Tensor:
        """[c, 1] number of buckets whose mass above is >= target, the index of the first one below it, given
        base < target (the mass above the last bucket)."""
        return (self.top[:, :-1] >= target).sum(dim=-1, keepdim=True)

    def at(self, bucket: torch.Tensor) -> torch.Tensor:
        """[c, 1] mass above ``bucket`` ([c, 1] long in 0..B-1)."""
        last = self.top.shape[-1] - 1
        return torch.where(bucket >= last, self.base, torch.gather(self.top, -1, (last - 1 - bucket).clamp_(min=0)))


def _nucleus_by_radix(e: torch.Tensor, mass: torch.Tensor, target: torch.Tensor, ws: _Workspace):
    """Nucleus boundary of fp32 rows by radix selection on the bits of e, without sorting: the same
    (tau [c, 1], count [c, 1] long) as _nucleus_by_sort, plus (above mask [c, V], n_above [c, 1], n_tied [c, 1]).

    e: [c, V] fp32 in [0, 1] (as _shifted_exp makes it); mass: e in fp64 (bucket sums of ~1e5 terms must resolve
    the boundary as finely as an fp64 cumsum); target: [c, 1] fp64, > 0. Non-negative fp32 values order like their
    int32 bit patterns, and e <= 1 keeps those below 2**30, so bits >> 15 is a bucket in 0..2**15 - 1. Two
    histogram passes of 15 bits narrow the boundary to one exact float; each keeps the bucket where the mass above
    it first falls below the target. The second pass keys every token relative to the chosen high bucket (below
    it -> bucket 0, above it -> the last bucket) and measures the mass above each of its sub-buckets from the
    first pass's mass above the high bucket, the same fp64 number, so the two passes cannot disagree about the
    high bucket (and take a whole bucket too many); the mass of the tokens tied at the boundary comes out of
    the same histogram. Given the target, the result equals exact rational arithmetic wherever the fp64 sums of the
    tokens above the boundary are exact (tested), and equals the sort path otherwise up to fp64 rounding.
    """
    n_buckets = 1 << 15
    bits = e.view(torch.int32)
    key = ws("key", e, torch.int64).copy_(bits)
    key >>= 15
    hist = torch.zeros(e.shape[0], n_buckets, dtype=torch.float64, device=e.device).scatter_add_(1, key, mass)
    # The mass above the last bucket is 0 < target, so high <= n_buckets - 1 already; the clamps guard the indices.
    above = _MassAbove.of(hist)
    high = above.count_at_least(target).clamp_(max=n_buckets - 1)
    mass_above_high = above.at(high)

    key.copy_(bits).sub_((high << 15) - 1).clamp_(0, n_buckets + 1)
    hist = torch.zeros(e.shape[0], n_buckets + 2, dtype=torch.float64, device=e.device).scatter_add_(1, key, mass)
    sub = hist[:, 1:-1]
    # Measured from the first pass's mass above the high bucket: the same fp64 number, and below the target.
    above = _MassAbove.of(sub, base=mass_above_high)
    low = above.count_at_least(target).clamp_(max=n_buckets - 1)
    tau = ((high << 15) | low).to(torch.int32).view(torch.float32)
    # tau is 0 only if fp64 rounding puts the target above the mass of every positive token (p within ulps of 1):
    # then no zero is "needed" and the divisions stay finite.
    tau64 = tau.double().clamp_(min=2.0**-149)
    # Every token equal to tau lands in sub-bucket low, and an fp64 sum of fewer than 2**29 equal fp32 values is exact.
    n_tied = (torch.gather(sub, -1, low) / tau64).round_()
    needed = torch.ceil((target - above.at(low)) / tau64).clamp_(min=1)
    above = torch.gt(e, tau, out=ws("above", e, torch.bool))
    n_above = _count(above, e.dtype)
    count = n_above.long() + torch.minimum(needed, n_tied).long()
    return tau, count, above, n_above, n_tied.to(e.dtype)


def _boundary(e: torch.Tensor, tau: torch.Tensor, size: torch.Tensor, ws: _Workspace) -> _Nucleus:
    n_tied = _count(torch.eq(e, tau, out=ws("above", e, torch.bool)), e.dtype)
    above = torch.gt(e, tau, out=ws("above", e, torch.bool))
    return _Nucleus(tau, size, above, _count(above, e.dtype), n_tied)


def _nucleus(e: torch.Tensor, region: TrustRegion, ws: _Workspace) -> _Nucleus:
    """The TRE-P region of one chunk (e = unnormalized probabilities [c, V])."""
    if e.dtype == torch.float32 and e.shape[-1] >= _RADIX_MIN_VOCAB:
        mass = ws("mass", e, torch.float64).copy_(e)
        target = region.top_p * mass.sum(dim=-1, keepdim=True)
        tau, count, above, n_above, n_tied = _nucleus_by_radix(e, mass, target, ws)
        nucleus = _Nucleus(tau, count.to(e.dtype), above, n_above, n_tied)
    else:
        tau, count = _nucleus_by_sort(e, region.top_p * e.sum(dim=-1, keepdim=True, dtype=torch.float64))
        nucleus = _boundary(e, tau, count.to(e.dtype), ws)
    if region.max_size is None:
        return nucleus
    cap = min(region.max_size, e.shape[-1])
    capped_tau = torch.topk(e, cap, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    over = nucleus.size > cap
    return _boundary(e, torch.where(over, capped_tau, nucleus.tau), nucleus.size.clamp(max=cap), ws)


def _region_weights(e: torch.Tensor, tau: torch.Tensor, share: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """[c, V] multiplier of e inside the region: 1 above tau, ``share`` ([c, 1]) for tokens tied at tau, else 0."""
    mask = ws("above", e, torch.bool)
    weights = torch.mul(torch.eq(e, tau, out=mask).view(torch.uint8), share, out=ws("weights", e))
    return weights.add_(torch.gt(e, tau, out=mask).view(torch.uint8))


def _scale(region: TrustRegion, vocab_size: int, size: torch.Tensor) -> torch.Tensor:
    """[c, 1] factor log(V) / log(|T|), 0 for one-token regions; 1 when scaling is off or for full entropy."""
    if region.mode == "full":
        return torch.ones_like(size)
    factor = math.log(vocab_size) / torch.log(size.clamp(min=2.0)) if region.scale else torch.ones_like(size)
    return torch.where(size > 1.5, factor, torch.zeros_like(size))


def _is_min_entropy(region: TrustRegion) -> bool:
    return region.mode == "top_k" and region.top_k == 1


def _entropy(total: torch.Tensor, dot: torch.Tensor):
    """(entropy, mean of z - max), each [c, 1], of the distribution proportional to weights w over the shifted
    logits s, from total = sum w and dot = sum w s."""
    mean = dot / total
    return total.log() - mean, mean


def _chunk_forward(
    z: torch.Tensor, region: TrustRegion, stats_top_k: int, with_stats: bool, ws: _Workspace,
    reference: _Reference = _NO_REFERENCE, with_lse: bool = False,
):
    """One chunk of rows [c, V] (fp32 or fp64) -> the per-row outputs in EntropyTerms' order ([c], the tail masses
    [c, len(reference.top_ks)]) and four per-row tensors [c] that backward needs: (tau, share of the tied tokens,
    region mean of z - max, d value / d region weight sum); ``with_lse`` appends the rows' logsumexp [c] (NaN for
    a non-finite row), which the fused lm head takes for its log-probs instead of a second pass over the chunk.

    The region boundary is kept as tau: TRE-K compares logits with it, TRE-P compares probabilities (they can tie
    where logits do not), full entropy takes every token.
    """
    vocab = z.shape[-1]
    row_max, shifted, e = _shifted_exp(z, ws)
    sum_exp = e.sum(dim=-1, keepdim=True)
    entropy_full, mean_full = _entropy(sum_exp, _dot(e, shifted, ws))
    ones = torch.ones_like(row_max)
    if region.mode == "full":
        size = torch.full_like(row_max, float(vocab))
        value, region_mass = entropy_full, ones
        saved = (torch.full_like(row_max, -math.inf), ones, mean_full, 1.0 / sum_exp)
    elif region.mode == "top_k":
        # The K largest logits alone give the region's sums; ties at the boundary do not change them. The backward
        # pass recomputes them (sparse), so it needs none of the per-row tensors.
        top = torch.topk(z, region.top_k, dim=-1, sorted=False).values
        size = torch.full_like(row_max, float(region.top_k))
        top_shifted = (top - row_max).clamp_(min=torch.finfo(z.dtype).min)
        top_exp = top_shifted.exp()
        region_sum = top_exp.sum(dim=-1, keepdim=True)
        region_entropy, _ = _entropy(region_sum, (top_exp * top_shifted).sum(dim=-1, keepdim=True))
        region_mass = region_sum / sum_exp
        # K = 1: logsumexp(z) - max(z), the reference's min-entropy.
        value = sum_exp.log() if _is_min_entropy(region) else region_entropy * _scale(region, vocab, size)
        saved = (ones,) * 4
    else:
        nucleus = _nucleus(e, region, ws)
        size, tau = nucleus.size, nucleus.tau
        inside = torch.mul(e, nucleus.above.view(torch.uint8), out=ws("weights", e))
        # The tied tokens taken have e == tau and z - max == log(tau) up to rounding: they enter in closed form.
        taken = size - nucleus.n_above
        region_sum = inside.sum(dim=-1, keepdim=True) + taken * tau
        region_entropy, mean = _entropy(region_sum, _dot(inside, shifted, ws) + taken * torch.xlogy(tau, tau))
        region_mass = region_sum / sum_exp
        scale = _scale(region, vocab, size)
        value = region_entropy * scale
        saved = (tau, taken / nucleus.n_tied, mean, scale / region_sum)

    if with_stats:
        reused = size if region.mode == "top_p" and region.top_p == reference.top_p and region.max_size is None else None
        topk_prob, top1_prob, tail_mass, nucleus_size = _chunk_stats(e, sum_exp, stats_top_k, reference, reused, ws)
    else:
        topk_prob = top1_prob = nucleus_size = torch.zeros_like(row_max)
        tail_mass = row_max.new_zeros(row_max.shape[0], len(reference.top_ks))
    rows = (value, entropy_full, region_mass, size, topk_prob, top1_prob, tail_mass, nucleus_size)
    # A non-finite row was computed on a stand-in (see _shifted_exp): all of its outputs are NaN, and backward
    # recomputes the same test to give it a NaN gradient. [c, 1] work, no host sync.
    bad = _non_finite_rows(row_max)
    rows = tuple(_nan_where(bad, t) for t in rows)
    rows = (*(t.squeeze(-1) for t in rows[:6]), rows[6], rows[7].squeeze(-1))
    saved = tuple(t.squeeze(-1) for t in saved)
    if not with_lse:
        return rows, saved
    # logsumexp = max + log(sum exp(z - max)): the operations and order of a plain logsumexp over the chunk.
    return rows, saved, _nan_where(bad, row_max + sum_exp.log()).squeeze(-1)


def _chunk_stats(e, sum_exp, stats_top_k: int, reference: _Reference, nucleus_size, ws: _Workspace):
    """(topk_prob, top1_prob, tail_mass, nucleus_size) of one chunk from e = exp(z - max) [c, V] and its row sums
    [c, 1]; one top-k of e serves every K. ``nucleus_size`` ([c, 1]) is the training region's when it is the
    reference nucleus already, else None. Runs after the training region is done with the workspace buffers."""
    vocab = e.shape[-1]
    top1_prob = 1.0 / sum_exp  # the largest e is exp(0) = 1
    k_max = min(max((stats_top_k, *reference.top_ks)), vocab)
    top_values, top_index = torch.topk(e, k_max, dim=-1)
    k = min(stats_top_k, vocab)  # the unnormalized mass of the k likeliest tokens (ties give the same sum):
    topk_prob = top1_prob if k == 1 else top_values[:, :k].sum(dim=-1, keepdim=True) / sum_exp
    tail_mass = sum_exp.new_zeros(e.shape[0], 0)
    if reference.top_ks:
        tail_mass = _tail_masses(e, sum_exp, top_values, top_index, reference.top_ks, ws)
    if reference.top_p is None:
        nucleus_size = torch.zeros_like(sum_exp)
    elif nucleus_size is None:
        nucleus_size = _nucleus(e, TrustRegion(mode="top_p", top_p=reference.top_p), ws).size
    return topk_prob, top1_prob, tail_mass, nucleus_size


def _tail_masses(e, sum_exp, top_values, top_index, top_ks: Sequence[int], ws: _Workspace) -> torch.Tensor:
    """[c, len(top_ks)] probability outside the K likeliest tokens, summed from the tail itself in fp64.

    ``1 - mass of the top K`` cancels in fp32: on a confident row (top two near 1) a true tail of 4.4e-9 read 0
    and 5.0e-7 read 7.4e-7. Summing the tail's own probabilities keeps their relative precision at any size.
    ``top_values``/``top_index`` are the k_max largest e per row, descending; the tokens outside them are summed
    once (with the top ones zeroed in a copy of e), and each K adds back the sorted values ranked K..k_max - 1.
    Tied tokens have equal e, so which of them the top K takes does not change the sum.
    """
    vocab, k_max = e.shape[-1], top_values.shape[-1]
    rest = ws("shifted", e).copy_(e).scatter_(-1, top_index, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
    # between[:, j] = sum of the sorted top values ranked j..k_max - 1 (j = k_max: none).
    between = torch.cat([top_values.double().flip(-1).cumsum(-1).flip(-1), rest.new_zeros(rest.shape)], dim=-1)
    tails = [rest + between[:, k : k + 1] if k < vocab else torch.zeros_like(rest) for k in map(int, top_ks)]
    return (torch.cat(tails, dim=-1) / sum_exp.double()).to(e.dtype)


def _top_k_backward(z: torch.Tensor, region: TrustRegion, g: torch.Tensor, out: torch.Tensor, ws: _Workspace) -> None:
    """Gradient of TRE-K (K >= 2) for one chunk into ``out``, from the K largest logits: only they (and ties) get
    gradient."""
    top, index = torch.topk(z, region.top_k, dim=-1, sorted=False)
    # topk returns a row's NaN or +inf among the top values, and only -inf ones for an all -inf row.
    g = _nan_where(_non_finite_rows(top.amax(dim=-1, keepdim=True)), g)
    tau = top.amin(dim=-1, keepdim=True)
    top_shifted = (top - top.amax(dim=-1, keepdim=True)).clamp_(min=torch.finfo(z.dtype).min)
    pi = top_shifted.exp()
    pi = pi / pi.sum(dim=-1, keepdim=True)
    mean = (pi * top_shifted).sum(dim=-1, keepdim=True)
    size = torch.full_like(tau, float(region.top_k))
    grad_top = -(g * _scale(region, z.shape[-1], size)) * pi * (top_shifted - mean)
    # All tokens tied at tau share evenly what the picked ones among them would get.
    picked_at = top == tau
    at = torch.eq(z, tau, out=ws("above", z, torch.bool))
    share = (grad_top * picked_at).sum(dim=-1, keepdim=True) / _count(at, z.dtype)
    torch.mul(at.view(torch.uint8), share, out=out)
    out.scatter_(-1, index, torch.where(picked_at, share, grad_top).to(out.dtype))


def _folds_softmax(region: TrustRegion) -> bool:
    """Whether _chunk_backward can add a softmax term to its gradient: the modes whose backward computes exp(z - max)
    over the whole chunk and keeps it to the end (full entropy, TRE-P)."""
    return region.mode in ("full", "top_p")


def _chunk_backward(
    z, region: TrustRegion, saved, g: torch.Tensor, out: torch.Tensor, ws: _Workspace, softmax=None
) -> None:
    """Writes d value / d z for one chunk [c, V], times the incoming per-row gradient g [c, 1], into ``out``, which
    may be z itself (z is read in full before out is written).

    ``softmax`` = (coef [c, 1], lse [c, 1]), only where _folds_softmax(region), adds coef * softmax(z) as well (the
    fused lm head's log-prob gradient, with lse the rows' logsumexp) from the exp(z - max) the entropy's gradient
    computes anyway, instead of a second exponential over the chunk.
    """
    if softmax is not None and not _folds_softmax(region):
        raise ValueError(f"the {region.mode} backward cannot add a softmax term")
    if region.mode == "top_k" and region.top_k > 1:
        return _top_k_backward(z, region, g, out, ws)
    row_max, shifted, e = _shifted_exp(z, ws)
    g = _nan_where(_non_finite_rows(row_max), g)
    if _is_min_entropy(region):
        # d/dz [logsumexp(z) - max(z)] = softmax(z) - (share of the maximum, split evenly among tied maxima)
        at_max = torch.eq(shifted, 0, out=ws("above", z, torch.bool))
        at_share = torch.mul(at_max.view(torch.uint8), 1.0 / _count(at_max, z.dtype), out=ws("weights", z))
        prob = e.div_(e.sum(dim=-1, keepdim=True)).sub_(at_share)
        torch.mul(prob, g, out=out)
        return None
    tau, share, mean, d_total = saved
    # dH_T/dz_a = -pi_T(a) (z_a - E_{pi_T}[z]) inside T, 0 outside; built in place in ``shifted``.
    grad = shifted.sub_(mean).mul_(e)
    if region.mode == "top_p":
        grad.mul_(_region_weights(e, tau, share, ws))
    torch.mul(grad, -(g * d_total), out=out)
    if softmax is not None:
        # softmax(z) = e * exp(max - lse); e is still exp(z - max) here.
        coef, lse = softmax
        out.addcmul_(e, coef * (row_max - lse).exp())
    return None


def _refuse_double_backward(name: str) -> None:
    """The backward passes are hand-written and not themselves differentiable; the engine enables grad mode in
    backward exactly when create_graph=True, which would otherwise fail deep inside with torch's own message."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name}: double backward is not supported (the backward pass is hand-written and not itself "
            f"differentiable); call backward/autograd.grad without create_graph=True through the entropy terms"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for fp16/bf16/fp32 logits; fp64 logits stay fp64 (references and gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(vocab: int, device: torch.device, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_ACCELERATOR) // vocab)


def _chunks(logits2d: torch.Tensor, chunk: int, ws: _Workspace):
    """(row slice, chunk in the compute dtype) for each chunk of rows; low-precision chunks are widened in place of
    a workspace buffer."""
    work = _compute_dtype(logits2d.dtype)
    for start in range(0, logits2d.shape[0], chunk):
        rows = slice(start, start + chunk)
        z = logits2d[rows]
        yield rows, z if z.dtype == work else ws("z", z, work).copy_(z)


class _EntropyTermsFn(torch.autograd.Function):
    """Chunked forward with the statistics as non-differentiable side outputs; recomputing backward."""

    @staticmethod
    def forward(ctx, logits2d, region, stats_top_k, with_stats, chunk, reference=_NO_REFERENCE):
        ws = _Workspace(min(chunk, logits2d.shape[0]))
        outs = [[] for _ in EntropyTerms._fields]
        saved = [[] for _ in range(4)]
        for _, z in _chunks(logits2d, chunk, ws):
            rows, keep = _chunk_forward(z, region, stats_top_k, with_stats, ws, reference)
            for lst, t in zip(outs, rows):
                lst.append(t)
            for lst, t in zip(saved, keep):
                lst.append(t)
        work = _compute_dtype(logits2d.dtype)
        # No rows: empty outputs, the tail masses keeping their column per reference K.
        empty = [(0,)] * len(outs)
        empty[EntropyTerms._fields.index("tail_mass")] = (0, len(reference.top_ks))
        outs = [torch.cat(lst) if lst else logits2d.new_zeros(shape, dtype=work) for lst, shape in zip(outs, empty)]
        saved = [torch.cat(lst) if lst else logits2d.new_zeros(0, dtype=work) for lst in saved]
        ctx.save_for_backward(logits2d, *saved)
        ctx.region, ctx.chunk = region, chunk
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_value, *unused):
        _refuse_double_backward("entropy_terms")
        logits2d, *saved = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        ws = _Workspace(min(ctx.chunk, logits2d.shape[0]))
        for rows, z in _chunks(logits2d, ctx.chunk, ws):
            per_row = tuple(t[rows].unsqueeze(-1) for t in saved)
            g = grad_value[rows].to(z.dtype).unsqueeze(-1)
            _chunk_backward(z, ctx.region, per_row, g, grad[rows], ws)
        return grad, None, None, None, None, None


@torch.compiler.disable  # eager, see _entropy_terms
def entropy_terms(
    logits: torch.Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    max_region_size: Optional[int] = None,
    scale: bool = True,
    stats_top_k: int = 1,
    with_stats: bool = True,
    chunk_size: Optional[int] = None,
    reference_top_k: Sequence[int] = (),
    reference_top_p: Optional[float] = None,
) -> EntropyTerms:
    """The regularizer and the trust-region statistics in one pass over the logits.

    Args:
        logits: [..., V] logits (fp16, bf16, fp32 or fp64), already divided by the temperature; -inf entries are
            tokens with no probability. A row with a NaN or +inf entry, or without a finite one, gives NaN in
            every output and in its gradient.
        top_k: K for TRE-K. top_p: p for TRE-P. Neither: full entropy.
        max_region_size: optional cap on the TRE-P region (the reference's cap: 256).
        scale: multiply TRE values by log(V) / log(|T|) (default, as the reference).
        stats_top_k: k of the logged top-k probability.
        with_stats: False skips the top-k probability and the reference statistics (the others come for free).
        chunk_size: rows per chunk (default: about 1M elements per chunk on CPU, 16M on a GPU).
        reference_top_k: Ks of the reference tail masses (``tail_mass`` gets one column per K); () skips them.
        reference_top_p: p of the reference nucleus (``nucleus_size``); None skips it (it costs about one TRE-P
            region selection, unless the regularizer is TRE-P with this p and no cap, whose nucleus is reused).

    Returns:
        EntropyTerms of [...]-shaped fp32 tensors (fp64 for fp64 logits; ``tail_mass`` [..., len(reference_top_k)]);
        only ``value`` carries gradient.
    """
    _check_logits(logits)
    region = TrustRegion.from_args(top_k, top_p, max_region_size, scale)
    return _entropy_terms(
        logits, region, stats_top_k=stats_top_k, with_stats=with_stats, chunk_size=chunk_size,
        reference=_Reference.from_args(reference_top_k, reference_top_p),
    )


def _validate_options(region: TrustRegion, vocab: int, stats_top_k) -> None:
    """The checks of entropy_terms and fused_linear_entropy_terms that need the vocabulary size."""
    region.validate(vocab)
    if isinstance(stats_top_k, bool) or not isinstance(stats_top_k, int) or stats_top_k < 1:
        raise ValueError(f"stats_top_k must be an integer >= 1, got {stats_top_k!r}")


# Eager under torch.compile: the chunk loop is Python over the row count, so a traced version would recompile for
# every new N (remove-padding changes N every micro-batch) and stop compiling at dynamo's recompile limit, and the
# hand-written chunked kernels leave a compiler little to fuse. A compiled caller gets one graph break here instead.
@torch.compiler.disable
def _entropy_terms(
    logits, region: TrustRegion, *, stats_top_k=1, with_stats=True, chunk_size=None, reference=_NO_REFERENCE
) -> EntropyTerms:
    """entropy_terms for an already validated region and reference (the actor validates once, at build time)."""
    vocab = logits.shape[-1]
    _validate_options(region, vocab, stats_top_k)
    lead = logits.shape[:-1]
    chunk = _chunk_rows(vocab, logits.device, chunk_size)
    outs = _EntropyTermsFn.apply(logits.reshape(-1, vocab), region, stats_top_k, with_stats, chunk, reference)
    return EntropyTerms(*(t.reshape(*lead, *t.shape[1:]) for t in outs))


@torch.compiler.disable  # eager, see _entropy_terms
def entropy_from_logits(
    logits: torch.Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    max_region_size: Optional[int] = None,
    scale: bool = True,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Full entropy (neither top_k nor top_p), TRE-K (top_k) or TRE-P (top_p) of each row, differentiable.

    Args:
        logits: [..., V] floating logits, already divided by the temperature.
        top_k: K >= 1 (K <= V). top_p: p in (0, 1). At most one of them.
        max_region_size: optional TRE-P region cap (the reference's cap: 256; see TrustRegion.max_size).
        scale: apply log(V) / log(|T|) to TRE values.

    Returns:
        [...] fp32 tensor (fp64 for fp64 logits), nats (scaled to [0, log V] for TRE).
    """
    return entropy_terms(
        logits, top_k, top_p, max_region_size=max_region_size, scale=scale, with_stats=False, chunk_size=chunk_size
    ).value


@torch.compiler.disable  # eager, see _entropy_terms
@torch.no_grad()
def trust_region_stats(
    logits: torch.Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    max_region_size: Optional[int] = None,
    stats_top_k: int = 1,
    chunk_size: Optional[int] = None,
    reference_top_k: Sequence[int] = (),
    reference_top_p: Optional[float] = None,
) -> dict:
    """Detached per-row statistics of the trust region, for logging.

    Returns a dict of [...] fp32 tensors: "entropy_full" (nats), "region_mass" (probability of the region under the
    full softmax), "region_size" (tokens), "topk_prob" (probability of the ``stats_top_k`` likeliest tokens),
    "top1_prob", "tre_value" (the regularizer's value), and the reference statistics asked for (see
    entropy_terms): "tail_mass" [..., len(reference_top_k)] and "nucleus_size".
    """
    terms = entropy_terms(
        logits, top_k, top_p, max_region_size=max_region_size, stats_top_k=stats_top_k, chunk_size=chunk_size,
        reference_top_k=reference_top_k, reference_top_p=reference_top_p,
    )
    stats = {
        "entropy_full": terms.entropy_full,
        "region_mass": terms.region_mass,
        "region_size": terms.region_size,
        "topk_prob": terms.topk_prob,
        "top1_prob": terms.top1_prob,
        "tre_value": terms.value,
    }
    if reference_top_k:
        stats["tail_mass"] = terms.tail_mass
    if reference_top_p is not None:
        stats["nucleus_size"] = terms.nucleus_size
    return stats


@torch.no_grad()
def mass_outside(logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
    """Probability the softmax of each row puts outside a given set of token ids, for logging and studies.

    Args:
        logits: [N, V] (any float dtype; computed in fp32, fp64 for fp64 logits).
        tokens: [N, k] int64 ids in [0, V) per row (repeats allowed; k = 0 gives mass 1).
        chunk_rows: rows per chunk (bounds the fp32 temporaries to chunk_rows x V).

    Returns:
        [N] fp64 tensor in [0, 1]: summed from the outside tokens' own probabilities (the top tokens zeroed in a
        copy), so a small mass keeps its relative precision (1 - mass inside would cancel). NaN for a row whose
        logits are not finite.
    """
    if logits.dim() != 2 or tokens.dim() != 2 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"need logits [N, V] and tokens [N, k], got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    work = torch.promote_types(logits.dtype, torch.float32)
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start : start + chunk_rows].to(work)
        row_max = z.amax(dim=-1, keepdim=True)
        e = torch.exp(z - row_max)
        total = e.sum(dim=-1, dtype=torch.float64)
        outside = e.scatter_(-1, tokens[start : start + chunk_rows], 0.0).sum(dim=-1, dtype=torch.float64)
        out[start : start + z.shape[0]] = _nan_where(~torch.isfinite(row_max.squeeze(-1)), outside / total)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fused lm-head path: log-probs and entropy terms from hidden states and the lm_head weight, without [N, V] logits.
# Built on the per-chunk machinery above (_chunk_forward / _chunk_backward / _Workspace / _chunk_rows / the region
# validation), so every entropy mode, statistic and numerical fix there applies here unchanged.
# ---------------------------------------------------------------------------------------------------------------

# Rows of one lm-head chunk hold [rows, V] logits in the compute dtype, which backward overwrites with their
# gradient. The matmul needs a hundred rows or so to run near the GEMM's speed (a chunk re-reads the whole [V, H]
# weight, and the weight's gradient is read and written once per chunk), while the entropy runs over sub-chunks of
# _chunk_rows() rows inside it. 2**24 elements (64 MiB of fp32 logits, 110 rows at V = 151,936) measured 8 % faster
# than 2**23 and 5 % slower than 2**25 on one core (H = 256, fp32, TRE-P; N = 440), and keeps the fused path's live
# memory at 0.13x the logits of N = 1,024 rows (2**25: about 0.24x, at the edge of the goal); a GPU takes 2**25.
_FUSED_CHUNK_ELEMENTS = {"cpu": 2**24}
_FUSED_CHUNK_ELEMENTS_ACCELERATOR = 2**25


def _check_fused_inputs(hidden_states, weight, labels, temperature) -> None:
    for name, t in (("hidden_states", hidden_states), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden_states.dtype not in _FLOAT_DTYPES or hidden_states.dim() != 2:
        raise ValueError(
            f"hidden_states must be a floating [N, H] tensor, got {hidden_states.dtype} of shape "
            f"{tuple(hidden_states.shape)}; flatten the leading dimensions first"
        )
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden_states.shape[1]:
        raise ValueError(
            f"weight must be the lm_head's [V, H] matrix with V >= 1 and H = hidden_states.shape[1] = "
            f"{hidden_states.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden_states.dtype:
        raise ValueError(
            f"hidden_states ({hidden_states.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one "
            "of them (under autocast, cast both to the autocast dtype)"
        )
    if labels.dtype != torch.int64 or labels.shape != hidden_states.shape[:1]:
        raise ValueError(
            f"labels must be an int64 [N] tensor of token ids with N = {hidden_states.shape[0]}, got {labels.dtype} "
            f"of shape {tuple(labels.shape)}"
        )
    if not hidden_states.device == weight.device == labels.device:
        raise ValueError(
            f"hidden_states, weight and labels must be on one device, got {hidden_states.device}, {weight.device}, "
            f"{labels.device}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _fused_chunk_rows(vocab: int, device: torch.device, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return _chunk_rows(vocab, device, chunk_size)
    budget = _FUSED_CHUNK_ELEMENTS.get(device.type, _FUSED_CHUNK_ELEMENTS_ACCELERATOR)
    return max(1, budget // vocab)


class _LinearChunks:
    """Recomputes [rows, V] logits chunks h @ W.T / temperature into reused buffers, in the compute dtype.

    Low-precision inputs go through the matmul in their own dtype (fp32 accumulation inside the GEMM) and are
    divided by the temperature there, as an lm_head under autocast followed by ``logits / temperature`` does; the
    result is then widened, like entropy_terms widens its input.
    """

    def __init__(self, hidden, weight, temperature: float, chunk: int):
        self.hidden, self.weight, self.temperature, self.chunk = hidden, weight, temperature, chunk
        self.work = _compute_dtype(hidden.dtype)
        rows = min(chunk, hidden.shape[0])
        self.buffer = torch.empty(rows, weight.shape[0], dtype=self.work, device=hidden.device)
        self.low = None if self.work == hidden.dtype else torch.empty_like(self.buffer, dtype=hidden.dtype)

    def __iter__(self):
        for start in range(0, self.hidden.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            h = self.hidden[rows]
            target = self.buffer if self.low is None else self.low
            z = torch.mm(h, self.weight.t(), out=target[: h.shape[0]])
            if self.temperature != 1.0:
                z.div_(self.temperature)
            yield rows, h, (z if self.low is None else self.buffer[: h.shape[0]].copy_(z))


def _sub_chunks(rows: slice, z: torch.Tensor, sub: int):
    """(global row slice, local row slice, rows) of each sub-chunk of ``sub`` rows of the chunk z at ``rows``."""
    for start in range(0, z.shape[0], sub):
        stop = min(start + sub, z.shape[0])
        yield slice(rows.start + start, rows.start + stop), slice(start, stop), z[start:stop]


def _accumulate_weight_grad(acc: torch.Tensor, grad_z: torch.Tensor, grad_z_low, h: torch.Tensor) -> None:
    """acc [V, H] += grad_z.T @ h for one chunk; acc is fp32 for low-precision inputs. On CPU each chunk's product
    is computed in fp32 too, so the sum over chunks is rounded to the weight's dtype once, as the unchunked matmul's
    is; on a GPU each chunk's bf16/fp16 product is rounded once (per chunk) before the fp32 sum."""
    if grad_z_low is None:
        acc.addmm_(grad_z.t(), h)
    elif acc.device.type == "cpu":
        # CPUs without native bf16 run an fp32 GEMM faster than a bf16 one, and the chunk's hidden rows are small.
        acc.addmm_(grad_z.t(), h.to(acc.dtype))
    else:
        acc.add_(torch.mm(grad_z_low.t(), h))


class _FusedLinearEntropyFn(torch.autograd.Function):
    """log-probs and EntropyTerms from hidden states and the lm_head weight, one chunk of rows at a time; the
    backward pass recomputes each chunk's logits. Outputs: (log_probs, *EntropyTerms fields); log_probs and value
    are differentiable, the statistics are not."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, region, stats_top_k, with_stats, chunk, sub, reference):
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        work = _compute_dtype(hidden.dtype)
        ctx.region, ctx.temperature, ctx.chunk, ctx.sub = region, temperature, chunk, sub
        if n == 0:
            outs = [hidden.new_zeros(0, dtype=work) for _ in range(1 + len(EntropyTerms._fields))]
            outs[1 + EntropyTerms._fields.index("tail_mass")] = hidden.new_zeros(0, len(reference.top_ks), dtype=work)
            ctx.save_for_backward(hidden, weight, labels)
            ctx.mark_non_differentiable(*outs[2:])
            return tuple(outs)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            ws = _Workspace(min(sub, n))
            log_probs, lse, rows_out, saved = [], [], None, None
            for rows, _, z in _LinearChunks(hidden, weight, temperature, chunk):
                for at, _, zs in _sub_chunks(rows, z, sub):
                    label_logit = zs.gather(-1, labels[at].unsqueeze(-1)).squeeze(-1)
                    row, keep, row_lse = _chunk_forward(
                        zs, region, stats_top_k, with_stats, ws, reference=reference, with_lse=True
                    )
                    lse.append(row_lse)
                    log_probs.append(label_logit - row_lse)
                    if rows_out is None:
                        rows_out, saved = [[] for _ in row], [[] for _ in keep]
                    for lst, t in zip(rows_out + saved, tuple(row) + tuple(keep)):
                        lst.append(t)
        outs = [torch.cat(log_probs)] + [torch.cat(lst) for lst in rows_out]
        ctx.save_for_backward(hidden, weight, labels, torch.cat(lse), *(torch.cat(lst) for lst in saved))
        ctx.mark_non_differentiable(*outs[2:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_value, *unused):
        _refuse_double_backward("fused_linear_entropy_terms")
        hidden, weight, labels, *rest = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if hidden.shape[0] == 0 or (grad_log_probs is None and grad_value is None) or not (need_h or need_w):
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            return grad_h, grad_w, None, None, None, None, None, None, None, None
        lse, *saved = rest
        work = _compute_dtype(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.zeros_like(weight, dtype=work) if need_w else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            chunks = _LinearChunks(hidden, weight, ctx.temperature, ctx.chunk)
            ws = _Workspace(min(ctx.sub, hidden.shape[0]))
            for rows, h, z in chunks:
                # The chunk's gradient overwrites its logits in place, one sub-chunk at a time, once each sub-chunk
                # has been read (the dense entropy backward copies it into the workspace first).
                for at, _, zs in _sub_chunks(rows, z, ctx.sub):
                    # d log_softmax(z)[label] / dz = onehot(label) - softmax(z)
                    g = None if grad_log_probs is None else grad_log_probs[at].to(work).unsqueeze(-1)
                    row_lse = lse[at].unsqueeze(-1)
                    if grad_value is None:
                        torch.sub(zs, row_lse, out=zs).exp_().mul_(-g)
                    else:
                        folds = g is not None and _folds_softmax(ctx.region)
                        probs = None
                        if g is not None and not folds:
                            probs = torch.sub(zs, row_lse, out=ws("lse", zs)).exp_()
                        per_row = tuple(t[at].unsqueeze(-1) for t in saved)
                        g_value = grad_value[at].to(work).unsqueeze(-1)
                        softmax = (-g, row_lse) if folds else None
                        _chunk_backward(zs, ctx.region, per_row, g_value, zs, ws, softmax=softmax)
                        if probs is not None:
                            zs.addcmul_(probs, g, value=-1.0)
                    if g is not None:
                        zs.scatter_add_(-1, labels[at].unsqueeze(-1), g)
                grad_z = z
                if ctx.temperature != 1.0:
                    grad_z.div_(ctx.temperature)
                # Low precision: the chunk's logits in the input dtype are spent; their buffer takes the gradient.
                grad_low = None if chunks.low is None else chunks.low[: z.shape[0]].copy_(grad_z)
                matmul_grad = grad_z if grad_low is None else grad_low
                if need_h:
                    torch.mm(matmul_grad, weight, out=grad_h[rows])
                if need_w:
                    _accumulate_weight_grad(acc, grad_z, grad_low, h)
        grad_w = None if acc is None else acc.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_linear_entropy_terms(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    max_region_size: Optional[int] = None,
    scale: bool = True,
    stats_top_k: int = 1,
    with_stats: bool = True,
    chunk_size: Optional[int] = None,
    reference_top_k: Sequence[int] = (),
    reference_top_p: Optional[float] = None,
):
    """Per-token log-probs and entropy terms straight from the lm_head, never holding [N, V] logits.

    Equal to ``log_softmax(hidden_states @ weight.T / temperature)[labels]`` and to
    ``entropy_terms(hidden_states @ weight.T / temperature, top_k, top_p, ...)``, with gradients w.r.t.
    hidden_states and weight through both the log-probs and ``value``. Rows go through in chunks of
    ``chunk_size``; backward recomputes each chunk's logits. Memory beyond the inputs and their gradients: one
    [chunk_size, V] buffer in the compute dtype (plus one in the input dtype for bf16/fp16), reused by backward
    for the chunk's gradient, the entropy workspace of entropy_terms, and for bf16/fp16 weights an fp32 [V, H]
    accumulator of the weight's gradient.

    Args:
        hidden_states: [N, H] final hidden states (fp16, bf16, fp32 or fp64), used in their own dtype (under
            autocast cast them and the weight to the autocast dtype first).
        weight: [V, H] lm_head weight, same dtype and device.
        labels: [N] int64 token ids in [0, V) whose log-probs are returned.
        temperature: logits are divided by it (> 0) before everything else.
        top_k, top_p, max_region_size, scale, stats_top_k, with_stats, reference_top_k, reference_top_p: as
            entropy_terms.
        chunk_size: rows per lm-head chunk (default: about 16M logits per chunk on CPU, 32M on a GPU).

    Returns:
        (log_probs [N], EntropyTerms of [N] tensors, tail_mass [N, len(reference_top_k)]), fp32 (fp64 for fp64
        inputs); log_probs and value carry gradient.
    """
    region = TrustRegion.from_args(top_k, top_p, max_region_size, scale)
    return _fused_linear_entropy_terms(
        hidden_states, weight, labels, region, temperature=temperature, stats_top_k=stats_top_k,
        with_stats=with_stats, chunk_size=chunk_size, reference=_Reference.from_args(reference_top_k, reference_top_p),
    )


def _fused_linear_entropy_terms(
    hidden_states, weight, labels, region: TrustRegion, *, temperature=1.0, stats_top_k=1, with_stats=True,
    chunk_size=None, reference=_NO_REFERENCE,
):
    """fused_linear_entropy_terms for an already built region (the actor validates its options once)."""
    _check_fused_inputs(hidden_states, weight, labels, temperature)
    vocab = weight.shape[0]
    _validate_options(region, vocab, stats_top_k)
    chunk = _fused_chunk_rows(vocab, hidden_states.device, chunk_size)
    sub = min(chunk, _chunk_rows(vocab, hidden_states.device, None))
    log_probs, *terms = _FusedLinearEntropyFn.apply(
        hidden_states, weight, labels, float(temperature), region, stats_top_k, with_stats, chunk, sub, reference
    )
    return log_probs, EntropyTerms(*terms)
