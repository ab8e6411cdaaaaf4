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
                H_T * log(V) / log(|T|), and 0 where |T| = 1. The nucleus is exact; ``max_region_size`` caps it
                only when asked (the reference capped it at 256 tokens, which changes wide nuclei).

The region is chosen without gradient; the gradient flows through the logits inside T only (through all logits
for K = 1, whose value contains the full logsumexp). Where tokens tied at the region's boundary are only partly
inside it, the value is the same whichever of them are taken, and each tied token receives the same share of the
gradient (the mean over the possible tie-breaks).

Memory: rows are processed in chunks, so fp32 temporaries never exceed ``chunk_size`` rows of the vocabulary; the
backward pass recomputes what it needs from the logits and a few numbers per row instead of keeping [N, V]
activations. Nothing here synchronizes the host with the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch

__all__ = [
    "TrustRegion",
    "EntropyTerms",
    "entropy_from_logits",
    "trust_region_stats",
    "entropy_terms",
]

Mode = Literal["full", "top_k", "top_p"]

# fp32 elements of one chunk's [rows, V] temporaries: 2**22 keeps them around 16 MiB each, which measured
# fastest on CPU (cache-resident) and bounds the GPU's extra memory to a few hundred MiB at any N.
_CHUNK_ELEMENTS = 2**22
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TrustRegion:
    """Which entropy to compute and how.

    mode: "full" (whole vocabulary), "top_k" (TRE-K) or "top_p" (TRE-P).
    top_k: K for "top_k", an integer >= 1.
    top_p: p for "top_p", in the open interval (0, 1).
    max_size: optional cap on the TRE-P region size (bit-faithful reproduction of the reference used 256);
        None computes the exact nucleus.
    scale: multiply by log(V) / log(|T|) (the reference does); False gives the plain renormalized entropy, useful
        to compare regularizers at equal effective strength.
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
    """

    value: torch.Tensor
    entropy_full: torch.Tensor
    region_mass: torch.Tensor
    region_size: torch.Tensor
    topk_prob: torch.Tensor


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be a floating tensor (fp16, bf16, fp32 or fp64), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")


def _shifted_exp(z: torch.Tensor):
    """(row_max [c, 1], shifted [c, V], e [c, V]) with shifted = z - row_max, and e = exp(shifted) in [0, 1].

    -inf logits are clamped to the dtype's lowest finite value in ``shifted`` so that e * shifted is 0 there, not
    NaN; e is 0 for them either way.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    shifted = (z - row_max).clamp_(min=torch.finfo(z.dtype).min)
    return row_max, shifted, shifted.exp()


def _nucleus_by_sort(e: torch.Tensor, target: torch.Tensor):
    """Nucleus boundary by a full sort (any dtype; used for fp64). e: [c, V] >= 0; target: [c, 1] fp64 mass.

    Returns (tau [c, 1], count [c, 1] long): the count of tokens whose preceding mass is below target, and the
    value of the last of them.
    """
    ordered = torch.sort(e, dim=-1, descending=True).values
    before = torch.cumsum(ordered, dim=-1, dtype=torch.float64) - ordered
    count = (before < target).sum(dim=-1, keepdim=True)
    return torch.gather(ordered, -1, count - 1), count


def _nucleus_by_radix(e: torch.Tensor, target: torch.Tensor):
    """Nucleus boundary of fp32 rows by radix selection on the bits of e, without sorting (same result as
    _nucleus_by_sort; several times faster on CPU, and no host synchronization).

    Non-negative fp32 values order like their int32 bit patterns, and e <= 1 keeps those below 2**30. Two passes
    of 15 bits each narrow the boundary to one exact float: each pass sums the fp64 mass of the candidates per
    bucket and keeps the bucket where the mass above it first falls below the target. Tokens tied at the
    boundary are then counted until the target is reached.
    """
    bits = e.view(torch.int32)
    mass = e.double()  # bucket sums of ~1e5 terms must resolve the boundary as finely as an fp64 cumsum
    above = torch.zeros_like(target)
    high = bits >> 15
    tau_bits = None
    for key in (high, bits & 0x7FFF):  # high 15 bits over all tokens, then low 15 bits inside the chosen bucket
        weights = mass if tau_bits is None else torch.where(high == tau_bits, mass, 0.0)
        buckets = torch.zeros(e.shape[0], 1 << 15, dtype=torch.float64, device=e.device)
        buckets.scatter_add_(1, key.long(), weights)
        # mass of the candidates above each bucket: all of them minus the running sum up to and including it
        running = buckets.cumsum_(-1)
        above_bucket = (running[:, -1:] + above) - running
        chosen = (above_bucket >= target).sum(dim=-1, keepdim=True)
        above = torch.gather(above_bucket, -1, chosen)
        tau_bits = chosen.to(torch.int32) if tau_bits is None else (tau_bits << 15) | chosen.to(torch.int32)
    tau = tau_bits.view(torch.float32)
    greater = (e > tau).sum(dim=-1, keepdim=True)
    tied = (e == tau).sum(dim=-1, keepdim=True)
    needed = torch.ceil((target - above) / tau.double().clamp(min=torch.finfo(torch.float32).tiny)).long()
    return tau, greater + torch.minimum(needed.clamp(min=1), tied)


def _nucleus(e: torch.Tensor, region: TrustRegion):
    """(tau [c, 1], size [c, 1] long) of the TRE-P region in probability space (e = unnormalized probabilities)."""
    target = region.top_p * e.sum(dim=-1, keepdim=True, dtype=torch.float64)
    # Radix selection pays off once V outgrows its 2**15 buckets per row; below that a sort is cheaper.
    radix = e.dtype == torch.float32 and e.shape[-1] >= 1 << 15
    tau, count = (_nucleus_by_radix if radix else _nucleus_by_sort)(e, target)
    if region.max_size is not None:
        cap = min(region.max_size, e.shape[-1])
        capped_tau = torch.topk(e, cap, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        tau = torch.where(count > cap, capped_tau, tau)
        count = count.clamp(max=cap)
    return tau, count


def _region_exp(e: torch.Tensor, key: torch.Tensor, tau: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """e restricted to the region {key > tau}, plus the share of the tokens tied at tau that completes ``size``."""
    above = key > tau
    at = key == tau
    share = (size - above.sum(dim=-1, keepdim=True)).to(e.dtype) / at.sum(dim=-1, keepdim=True).to(e.dtype)
    return torch.where(above, e, torch.where(at, e * share, 0.0))


def _scale(region: TrustRegion, vocab_size: int, size: torch.Tensor) -> torch.Tensor:
    """[c, 1] factor log(V) / log(|T|), 0 for one-token regions; 1 when scaling is off or for full entropy."""
    if region.mode == "full":
        return torch.ones_like(size)
    factor = math.log(vocab_size) / torch.log(size.clamp(min=2.0)) if region.scale else torch.ones_like(size)
    return torch.where(size > 1.5, factor, torch.zeros_like(size))


def _is_min_entropy(region: TrustRegion) -> bool:
    return region.mode == "top_k" and region.top_k == 1


def _entropy(weights_exp: torch.Tensor, shifted: torch.Tensor):
    """(entropy [c, 1], weight sum [c, 1]) of the renormalized distribution proportional to weights_exp."""
    total = weights_exp.sum(dim=-1, keepdim=True)
    return total.log() - torch.linalg.vecdot(weights_exp, shifted).unsqueeze(-1) / total, total


def _chunk_forward(z: torch.Tensor, region: TrustRegion, stats_top_k: int, with_stats: bool):
    """One chunk of rows [c, V] (fp32 or fp64) -> per-row outputs [c] and what backward needs.

    The region boundary is kept as (tau, size): TRE-K compares logits with tau, TRE-P compares probabilities
    (they can tie where logits do not), full entropy takes every token.
    """
    vocab = z.shape[-1]
    row_max, shifted, e = _shifted_exp(z)
    entropy_full, sum_exp = _entropy(e, shifted)
    if region.mode == "full":
        tau = torch.full_like(row_max, -math.inf)
        size = torch.full_like(row_max, float(vocab))
        value, region_mass = entropy_full, torch.ones_like(row_max)
    elif region.mode == "top_k":
        # The K largest logits alone give the region's sums; ties at the boundary do not change them.
        top = torch.topk(z, region.top_k, dim=-1, sorted=False).values
        tau = top.amin(dim=-1, keepdim=True)
        size = torch.full_like(tau, float(region.top_k))
        top_shifted = (top - row_max).clamp_(min=torch.finfo(z.dtype).min)
        region_entropy, region_sum = _entropy(top_shifted.exp(), top_shifted)
        region_mass = region_sum / sum_exp
        # K = 1: logsumexp(z) - max(z), the reference's min-entropy.
        value = sum_exp.log() if _is_min_entropy(region) else region_entropy * _scale(region, vocab, size)
    else:
        tau, count = _nucleus(e, region)
        size = count.to(z.dtype)
        region_entropy, region_sum = _entropy(_region_exp(e, e, tau, count), shifted)
        region_mass = region_sum / sum_exp
        value = region_entropy * _scale(region, vocab, size)

    if with_stats:
        top = torch.topk(e, min(stats_top_k, vocab), dim=-1, sorted=False).values
        topk_prob = top.sum(dim=-1, keepdim=True) / sum_exp
    else:
        topk_prob = torch.zeros_like(row_max)
    rows = (value, entropy_full, region_mass, size, topk_prob)
    return tuple(t.squeeze(-1) for t in rows), (tau.squeeze(-1), size.squeeze(-1))


def _top_k_backward(z: torch.Tensor, region: TrustRegion, g: torch.Tensor) -> torch.Tensor:
    """Gradient of TRE-K (K >= 2) for one chunk, from the K largest logits: only they (and ties) get gradient."""
    top, index = torch.topk(z, region.top_k, dim=-1, sorted=False)
    tau = top.amin(dim=-1, keepdim=True)
    top_shifted = (top - top.amax(dim=-1, keepdim=True)).clamp_(min=torch.finfo(z.dtype).min)
    pi = top_shifted.exp()
    pi = pi / pi.sum(dim=-1, keepdim=True)
    mean = (pi * top_shifted).sum(dim=-1, keepdim=True)
    size = torch.full_like(tau, float(region.top_k))
    grad_top = -(g * _scale(region, z.shape[-1], size)) * pi * (top_shifted - mean)
    # All tokens tied at tau share evenly what the picked ones among them would get.
    picked_at = top == tau
    at = z == tau
    share = (grad_top * picked_at).sum(dim=-1, keepdim=True) / at.sum(dim=-1, keepdim=True).to(z.dtype)
    grad = torch.where(at, share, 0.0)
    return grad.scatter_(-1, index, torch.where(picked_at, share, grad_top))


def _chunk_backward(z: torch.Tensor, region: TrustRegion, tau, size, grad_value) -> torch.Tensor:
    """d value / d z for one chunk [c, V], times the incoming per-row gradient [c]."""
    g = grad_value.unsqueeze(-1)
    if region.mode == "top_k" and region.top_k > 1:
        return _top_k_backward(z, region, g)
    _, shifted, e = _shifted_exp(z)
    if _is_min_entropy(region):
        # d/dz [logsumexp(z) - max(z)] = softmax(z) - (share of the maximum, split evenly among tied maxima)
        at_max = (shifted == 0).to(z.dtype)
        return g * (e / e.sum(-1, keepdim=True) - at_max / at_max.sum(-1, keepdim=True))
    tau, size = tau.unsqueeze(-1), size.unsqueeze(-1)
    weights = e if region.mode == "full" else _region_exp(e, e, tau, size)
    total = weights.sum(dim=-1, keepdim=True)
    mean = torch.linalg.vecdot(weights, shifted).unsqueeze(-1) / total
    # dH_T/dz_a = -pi_T(a) (z_a - E_{pi_T}[z]) inside T, 0 outside; built in place in ``shifted``.
    return shifted.sub_(mean).mul_(weights).mul_(-(g * _scale(region, z.shape[-1], size)) / total)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for fp16/bf16/fp32 logits; fp64 logits stay fp64 (references and gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // vocab)


class _EntropyTermsFn(torch.autograd.Function):
    """Chunked forward with the statistics as non-differentiable side outputs; recomputing backward."""

    @staticmethod
    def forward(ctx, logits2d, region, stats_top_k, with_stats, chunk):
        work = _compute_dtype(logits2d.dtype)
        outs = [[] for _ in range(5)]
        saved = [[] for _ in range(2)]
        for start in range(0, logits2d.shape[0], chunk):
            rows, keep = _chunk_forward(logits2d[start : start + chunk].to(work), region, stats_top_k, with_stats)
            for lst, t in zip(outs, rows):
                lst.append(t)
            for lst, t in zip(saved, keep):
                lst.append(t)
        outs = [torch.cat(lst) if lst else logits2d.new_zeros(0, dtype=work) for lst in outs]
        saved = [torch.cat(lst) if lst else logits2d.new_zeros(0, dtype=work) for lst in saved]
        ctx.save_for_backward(logits2d, *saved)
        ctx.region, ctx.chunk = region, chunk
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_value, *unused):
        logits2d, tau, size = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        chunk = ctx.chunk
        for start in range(0, logits2d.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = logits2d[sl].to(tau.dtype)
            g = _chunk_backward(z, ctx.region, tau[sl], size[sl], grad_value[sl].to(tau.dtype))
            grad[sl] = g.to(grad.dtype)
        return grad, None, None, None, None


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
) -> EntropyTerms:
    """The regularizer and the trust-region statistics in one pass over the logits.

    Args:
        logits: [..., V] logits (fp16, bf16, fp32 or fp64), already divided by the temperature. Each row needs at
            least one finite entry; -inf entries are tokens with no probability.
        top_k: K for TRE-K. top_p: p for TRE-P. Neither: full entropy.
        max_region_size: optional cap on the TRE-P region (reference reproduction: 256).
        scale: multiply TRE values by log(V) / log(|T|) (default, as the reference).
        stats_top_k: k of the logged top-k probability.
        with_stats: False skips the top-k probability (the other statistics come for free).
        chunk_size: rows per chunk (default: about 4M elements per chunk).

    Returns:
        EntropyTerms of [...]-shaped fp32 tensors (fp64 for fp64 logits); only ``value`` carries gradient.
    """
    _check_logits(logits)
    region = TrustRegion.from_args(top_k, top_p, max_region_size, scale)
    return _entropy_terms(logits, region, stats_top_k=stats_top_k, with_stats=with_stats, chunk_size=chunk_size)


def _entropy_terms(logits, region: TrustRegion, *, stats_top_k=1, with_stats=True, chunk_size=None) -> EntropyTerms:
    """entropy_terms for an already validated region (the actor validates once, at build time)."""
    vocab = logits.shape[-1]
    region.validate(vocab)
    if isinstance(stats_top_k, bool) or not isinstance(stats_top_k, int) or stats_top_k < 1:
        raise ValueError(f"stats_top_k must be an integer >= 1, got {stats_top_k!r}")
    lead = logits.shape[:-1]
    outs = _EntropyTermsFn.apply(logits.reshape(-1, vocab), region, stats_top_k, with_stats, _chunk_rows(vocab, chunk_size))
    return EntropyTerms(*(t.reshape(lead) for t in outs))


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
        max_region_size: optional TRE-P region cap, for bit-faithful reproduction of the reference (256).
        scale: apply log(V) / log(|T|) to TRE values.

    Returns:
        [...] fp32 tensor (fp64 for fp64 logits), nats (scaled to [0, log V] for TRE).
    """
    return entropy_terms(
        logits, top_k, top_p, max_region_size=max_region_size, scale=scale, with_stats=False, chunk_size=chunk_size
    ).value


@torch.no_grad()
def trust_region_stats(
    logits: torch.Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    max_region_size: Optional[int] = None,
    stats_top_k: int = 1,
    chunk_size: Optional[int] = None,
) -> dict:
    """Detached per-row statistics of the trust region, for logging.

    Returns a dict of [...] fp32 tensors: "entropy_full" (nats), "region_mass" (probability of the region under the
    full softmax), "region_size" (tokens), "topk_prob" (probability of the ``stats_top_k`` likeliest tokens) and
    "tre_value" (the regularizer's value).
    """
    terms = entropy_terms(
        logits, top_k, top_p, max_region_size=max_region_size, stats_top_k=stats_top_k, chunk_size=chunk_size
    )
    return {
        "entropy_full": terms.entropy_full,
        "region_mass": terms.region_mass,
        "region_size": terms.region_size,
        "topk_prob": terms.topk_prob,
        "tre_value": terms.value,
    }
