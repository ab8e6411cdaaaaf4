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


def _region_weights(z: torch.Tensor, region: TrustRegion, row_max: torch.Tensor, log_sum_exp: torch.Tensor):
    """Boundary of the trust region for a chunk of rows.

    z: [c, V] fp32 logits; row_max, log_sum_exp: [c, 1], so that log-softmax(z) = z - row_max - log_sum_exp.
    Returns (tau, tie_weight, size), each [c, 1]: the region is {z > tau} plus a fraction tie_weight of the tokens
    with z == tau, holding ``size`` tokens in all. tau is always one of the row's own logits.
    """
    if region.mode == "top_k":
        k = region.top_k
        tau = torch.topk(z, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        size = torch.full_like(tau, float(k))
    else:
        sorted_z = torch.sort(z, dim=-1, descending=True).values
        probs = ((sorted_z - row_max) - log_sum_exp).exp()
        # fp64 running sums: at V = 152k an fp32 cumsum drifts by ~1e-5, enough to move a nucleus boundary.
        mass_before = torch.cumsum(probs, dim=-1, dtype=torch.float64) - probs
        count = (mass_before < region.top_p).sum(dim=-1, keepdim=True)
        if region.max_size is not None:
            count = count.clamp(max=region.max_size)
        tau = torch.gather(sorted_z, -1, count - 1)
        size = count.to(z.dtype)
    above = (z > tau).sum(dim=-1, keepdim=True).to(z.dtype)
    tied = (z == tau).sum(dim=-1, keepdim=True).to(z.dtype)
    return tau, (size - above) / tied, size


def _weights(z: torch.Tensor, tau: torch.Tensor, tie_weight: torch.Tensor) -> torch.Tensor:
    """[c, V] membership weights: 1 above tau, tie_weight at tau, 0 below."""
    return (z > tau).to(z.dtype) + (z == tau).to(z.dtype) * tie_weight


def _scale(region: TrustRegion, vocab_size: int, size: torch.Tensor) -> torch.Tensor:
    """[c, 1] factor log(V) / log(|T|), 0 for one-token regions; 1 when scaling is off or for full entropy."""
    if region.mode == "full":
        return torch.ones_like(size)
    factor = math.log(vocab_size) / torch.log(size.clamp(min=2.0)) if region.scale else torch.ones_like(size)
    return torch.where(size > 1.5, factor, torch.zeros_like(size))


def _is_min_entropy(region: TrustRegion) -> bool:
    return region.mode == "top_k" and region.top_k == 1


def _chunk_forward(z: torch.Tensor, region: TrustRegion, stats_top_k: int, with_stats: bool):
    """One chunk of rows, fp32 [c, V] -> per-row values and what backward needs ([c] or [c, 1] tensors)."""
    vocab = z.shape[-1]
    row_max = z.amax(dim=-1, keepdim=True)
    shifted = z - row_max
    exp_shifted = shifted.exp()
    sum_exp = exp_shifted.sum(dim=-1, keepdim=True)
    log_sum_exp = sum_exp.log()
    # 0 instead of -inf where a token has no probability, so that 0 * -inf never appears.
    centred = torch.where(exp_shifted > 0, shifted, torch.zeros_like(shifted))
    entropy_full = log_sum_exp - (exp_shifted * centred).sum(dim=-1, keepdim=True) / sum_exp

    if region.mode == "full":
        tau = torch.full_like(row_max, -math.inf)
        tie_weight = torch.ones_like(row_max)
        size = torch.full_like(row_max, float(vocab))
        value, region_mass = entropy_full, torch.ones_like(row_max)
    else:
        tau, tie_weight, size = _region_weights(z, region, row_max, log_sum_exp)
        region_exp = exp_shifted * _weights(z, tau, tie_weight)
        region_sum = region_exp.sum(dim=-1, keepdim=True)
        region_entropy = region_sum.log() - (region_exp * centred).sum(dim=-1, keepdim=True) / region_sum
        region_mass = region_sum / sum_exp
        # K = 1: logsumexp(z) - max(z), the reference's min-entropy.
        value = log_sum_exp if _is_min_entropy(region) else region_entropy * _scale(region, vocab, size)
    scale = _scale(region, vocab, size)  # recomputed from size: cheaper than keeping it in both branches

    if with_stats:
        k = min(stats_top_k, vocab)
        top = torch.topk(shifted, k, dim=-1, sorted=False).values
        topk_prob = (top - log_sum_exp).exp().sum(dim=-1, keepdim=True)
    else:
        topk_prob = torch.zeros_like(row_max)
    rows = (value, entropy_full, region_mass, size, topk_prob)
    return tuple(t.squeeze(-1) for t in rows), (tau.squeeze(-1), tie_weight.squeeze(-1), scale.squeeze(-1))


def _chunk_backward(z: torch.Tensor, region: TrustRegion, tau, tie_weight, scale, grad_value) -> torch.Tensor:
    """d value / d z for one chunk, fp32 [c, V], times the incoming per-row gradient [c]."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    exp_shifted = shifted.exp()
    g = grad_value.unsqueeze(-1)
    if _is_min_entropy(region):
        # d/dz [logsumexp(z) - max(z)] = softmax(z) - (share of the maximum, split evenly among tied maxima)
        at_max = (shifted == 0).to(z.dtype)
        return g * (exp_shifted / exp_shifted.sum(-1, keepdim=True) - at_max / at_max.sum(-1, keepdim=True))
    weights = exp_shifted if region.mode == "full" else exp_shifted * _weights(z, tau.unsqueeze(-1), tie_weight.unsqueeze(-1))
    pi = weights / weights.sum(dim=-1, keepdim=True)
    centred = torch.where(pi > 0, shifted, torch.zeros_like(shifted))
    mean = (pi * centred).sum(dim=-1, keepdim=True)
    # dH_T/dz_a = -pi_T(a) (z_a - E_{pi_T}[z]) inside T, 0 outside.
    return -(g * scale.unsqueeze(-1)) * pi * (centred - mean)


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
        saved = [[] for _ in range(3)]
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
        logits2d, tau, tie_weight, scale = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        chunk = ctx.chunk
        for start in range(0, logits2d.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = logits2d[sl].to(tau.dtype)
            g = _chunk_backward(z, ctx.region, tau[sl], tie_weight[sl], scale[sl], grad_value[sl].to(tau.dtype))
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
