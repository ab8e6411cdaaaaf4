"""The actor's exploration options, read from verl's actor config and validated once, before any work starts.

Keys (under ``actor_rollout_ref.actor``):

    entropy_coeff: 0.0            # weight of the entropy term: policy_loss = pg_loss - entropy_coeff * agg(term)
    trust_region:
      mode: full                  # full (PPO + entropy bonus) | top_k (TRE-K) | top_p (TRE-P)
      top_k: 2                    # K of TRE-K
      top_p: 0.99                 # p of TRE-P
      max_size: null              # cap on the TRE-P region; the reference capped at 256 (its fp32 sums still differ)
      scale: true                 # multiply TRE by log V / log |T|
      metrics: true               # log the reference statistics and the regularizer's value, region mass/size
      reference_top_k: [2, 10]    # Ks of the logged tail masses (probability outside the top K), every method
      reference_top_p: 0.99       # p of the logged nucleus size, every method; null skips it (its cost)
    forking_tokens:
      enable: false               # keep the policy-gradient loss on the highest-entropy tokens only
      top_ratio: 0.2              # keeps exactly ceil(ratio * n) tokens (decimal ratio), at least one
      scope: micro_batch          # micro_batch (as the reference) | mini_batch (over all data-parallel ranks)
    policy_loss:
      loss_mode: clipped_kl_cov   # the paper's KL-Cov (kl_cov_ratio 0.002, ppo_kl_coef 1.0 in its scripts)
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

from verl_tre.trainer.ppo.core_algos import CLIPPED_KL_COV
from verl_tre.utils.torch_functional import TrustRegion

__all__ = ["TREOptions"]

_SCOPES = ("micro_batch", "mini_batch")
# Loss modes that already choose which tokens carry the policy gradient; the Forking mask would fight them.
_TOKEN_SELECTING_LOSSES = (CLIPPED_KL_COV, "kl_cov", "clip_cov")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _section(config, key: str) -> dict:
    section = config.get(key) if hasattr(config, "get") else None
    if section is None:
        return {}
    return {k: section.get(k) for k in section.keys()}


def _reference_regions(tr: dict) -> tuple[tuple, float | None]:
    """(Ks, p) of the reference statistics every method logs, validated."""
    ks = tr.get("reference_top_k", (2, 10))
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"actor.trust_region.reference_top_k must be a list of integers >= 1 such as [2, 10], got {ks!r}")
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(
            f"actor.trust_region.reference_top_k must be a list of distinct integers >= 1 such as [2, 10], got {list(ks)!r}"
        )
    p = tr.get("reference_top_p", 0.99)
    if p is not None:
        p = _number(p, "actor.trust_region.reference_top_p")
        if not 0.0 < p < 1.0:
            raise ValueError(f"actor.trust_region.reference_top_p must be in the open interval (0, 1) or null, got {p}")
    return ks, p


@dataclass(frozen=True)
class TREOptions:
    """Validated exploration options of one actor."""

    entropy_coeff: float
    region: TrustRegion
    metrics: bool
    reference_top_k: tuple
    reference_top_p: float | None
    forking: bool
    forking_ratio: float
    forking_scope: str

    @property
    def needs_entropy_terms(self) -> bool:
        """Whether update_policy must compute the entropy terms from the logits."""
        return self.entropy_coeff != 0 or self.metrics or self.forking

    @classmethod
    def from_actor_config(cls, config) -> "TREOptions":
        """Reads and validates the options from verl's actor config (DictConfig or dict). Every option works with
        use_fused_kernels too (the fused lm-head path computes the same entropy columns).

        Raises:
            ValueError: naming the option, the bad value and what is allowed.
        """
        coeff = _number(config.get("entropy_coeff", 0.0), "actor.entropy_coeff")
        if coeff < 0:
            raise ValueError(f"actor.entropy_coeff must be >= 0 (it is subtracted from the loss), got {coeff}")

        tr = _section(config, "trust_region")
        mode = tr.get("mode") or "full"
        if mode not in ("full", "top_k", "top_p"):
            raise ValueError(f"actor.trust_region.mode must be one of full, top_k, top_p; got {mode!r}")
        top_k = tr.get("top_k", 2) if mode == "top_k" else None
        top_p = tr.get("top_p", 0.99) if mode == "top_p" else None
        if top_p is not None:
            top_p = _number(top_p, "actor.trust_region.top_p")
        max_size = tr.get("max_size") if mode == "top_p" else None
        try:
            region = TrustRegion(mode=mode, top_k=top_k, top_p=top_p, max_size=max_size, scale=tr.get("scale", True))
            region.validate()
        except ValueError as err:
            raise ValueError(f"actor.trust_region: {err}") from None
        reference_top_k, reference_top_p = _reference_regions(tr)

        fk = _section(config, "forking_tokens")
        forking = bool(fk.get("enable", False))
        ratio = _number(fk.get("top_ratio", 0.2), "actor.forking_tokens.top_ratio")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"actor.forking_tokens.top_ratio must be in (0, 1], got {ratio}")
        scope = fk.get("scope", "micro_batch")
        if scope not in _SCOPES:
            raise ValueError(f"actor.forking_tokens.scope must be one of {', '.join(_SCOPES)}; got {scope!r}")

        loss_mode = (_section(config, "policy_loss").get("loss_mode")) or "vanilla"
        if forking and loss_mode in _TOKEN_SELECTING_LOSSES:
            raise ValueError(
                f"actor.forking_tokens.enable=true cannot be combined with policy_loss.loss_mode={loss_mode}: both "
                "choose which tokens carry the policy gradient. Use one baseline per run (loss_mode=vanilla for Forking Tokens)."
            )
        if loss_mode == CLIPPED_KL_COV:
            pl = _section(config, "policy_loss")
            kl_ratio = _number(pl.get("kl_cov_ratio"), "actor.policy_loss.kl_cov_ratio")
            if not 0.0 < kl_ratio <= 1.0:
                raise ValueError(f"actor.policy_loss.kl_cov_ratio must be in (0, 1] for {CLIPPED_KL_COV}, got {kl_ratio}")
            if _number(pl.get("ppo_kl_coef"), "actor.policy_loss.ppo_kl_coef") < 0:
                raise ValueError(f"actor.policy_loss.ppo_kl_coef must be >= 0, got {pl.get('ppo_kl_coef')}")
        if mode != "full" and coeff == 0:
            warnings.warn(
                f"actor.trust_region.mode={mode} with entropy_coeff=0: the TRE term has no effect on the loss "
                "(its statistics are still logged). Set entropy_coeff > 0 (the paper uses 0.001).",
                stacklevel=2,
            )
        return cls(
            entropy_coeff=coeff,
            region=region,
            metrics=bool(tr.get("metrics", True)),
            reference_top_k=reference_top_k,
            reference_top_p=reference_top_p,
            forking=forking,
            forking_ratio=ratio,
            forking_scope=scope,
        )
