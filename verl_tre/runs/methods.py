"""Which of the paper's methods an actor config trains, and the options that tell its variants apart.

The trainer names runs by these (verl_tre.runs.identity), the record stores them (verl_tre.runs.record), and the
tables and plots label rows and lines with them (verl_tre.runs.groups).
"""

from __future__ import annotations

from typing import Any, Mapping

# The paper's methods, in its order (rows of the tables, legend order of the plots), with their labels.
METHODS = {
    "ppo": "PPO",
    "entropy": "Entropy",
    "forking_tokens": "Forking Tokens",
    "kl_cov": "KL-Cov",
    "tre_k": "TRE-K",
    "tre_p": "TRE-P",
}


def detect_method(actor: Mapping[str, Any]) -> str:
    """The paper's method name for an actor config: ppo, entropy, forking_tokens, kl_cov, tre_k or tre_p."""
    trust_region = actor.get("trust_region") or {}
    forking = actor.get("forking_tokens") or {}
    loss_mode = (actor.get("policy_loss") or {}).get("loss_mode", "vanilla")
    coeff = float(actor.get("entropy_coeff") or 0.0)
    if forking.get("enable", False):
        return "forking_tokens"
    if loss_mode in ("clipped_kl_cov", "kl_cov"):
        return "kl_cov"
    if coeff > 0:
        mode = trust_region.get("mode", "full")
        return {"top_k": "tre_k", "top_p": "tre_p"}.get(mode, "entropy")
    return "ppo"


def method_options(actor: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the actor's method that tell its variants apart (coefficient, K, p, cap, ratios)."""
    method = detect_method(actor)
    coeff = float(actor.get("entropy_coeff") or 0.0)
    region = actor.get("trust_region") or {}
    options: dict[str, Any] = {}
    if method == "tre_k":
        options["top_k"] = region.get("top_k")
    elif method == "tre_p":
        options["top_p"] = region.get("top_p")
        if region.get("max_size") is not None:
            options["max_size"] = region.get("max_size")
    if method in ("tre_k", "tre_p") and region.get("scale", True) is False:
        options["scale"] = False
    if method == "forking_tokens":
        forking = actor.get("forking_tokens") or {}
        options["top_ratio"] = forking.get("top_ratio")
        if forking.get("scope", "micro_batch") != "micro_batch":
            options["scope"] = forking.get("scope")
    if method == "kl_cov":
        loss = actor.get("policy_loss") or {}
        options.update(loss_mode=loss.get("loss_mode"), kl_cov_ratio=loss.get("kl_cov_ratio"),
                       ppo_kl_coef=loss.get("ppo_kl_coef"))
    if coeff > 0 or method in ("entropy", "tre_k", "tre_p"):
        options["entropy_coeff"] = coeff
    return options
