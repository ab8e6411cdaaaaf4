"""verl's data-parallel PPO actor with trust-region entropy, Forking Tokens and the paper's KL-Cov.

The forward pass stays verl's (remove-padding, Ulysses sequence parallelism, padded path): the actor only swaps the
entropy function it calls for one that returns, per token, columns computed in one pass over the logits:

    [value, entropy_full, region_mass, region_size, top1_prob, nucleus_size, tail_mass_top{K} for each reference K]

(``value`` is the configured regularizer and the only column with gradient; the columns after region_size are the
reference statistics, on the same fixed regions for every method). verl pads, gathers and slices those columns
like its own entropy (with use_fused_kernels the model's fused forward, verl_tre/models/fused_forward.py, returns
the same columns from the hidden states and the lm_head weight, without logits). ``update_policy`` then composes

    policy_loss = pg_loss(tokens kept by the Forking mask, if on) - entropy_coeff * agg(value) [+ kl_loss]

and logs what the regularizer did (see ``TREOptions`` for the config keys).
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager, nullcontext

import torch
import verl.utils.torch_functional as verl_F
import verl.workers.actor.dp_actor as verl_dp_actor
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss, get_policy_loss_fn, kl_penalty
from verl.utils.debug import GPUMemoryLogger
from verl.utils.device import get_device_id
from verl.utils.seqlen_balancing import rearrange_micro_batches
from verl.workers.actor.dp_actor import DataParallelPPOActor

from verl_tre.models import fused_forward
from verl_tre.trainer.ppo.core_algos import CLIPPED_KL_COV, forking_mini_batch_mask, forking_token_mask, kl_cov_token_count
from verl_tre.utils.torch_functional import EntropyTerms, TrustRegion, _entropy_terms, _Reference
from verl_tre.workers.actor.options import TREOptions

__all__ = ["TREDataParallelPPOActor", "COLUMNS", "column_names", "region_metric_names", "terms_to_columns"]

logger = logging.getLogger(__file__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

# Fixed columns; one tail-mass column per reference K follows them (see column_names).
COLUMNS = ("value", "entropy_full", "region_mass", "region_size", "top1_prob", "nucleus_size")
_FULL = TrustRegion()


class TREDataParallelPPOActor(DataParallelPPOActor):
    """DataParallelPPOActor whose entropy term is full entropy, TRE-K or TRE-P, with Forking Tokens and KL-Cov."""

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        self.tre = TREOptions.from_actor_config(config)
        self._reference = _Reference(self.tre.reference_top_k, self.tre.reference_top_p)
        if config.get("use_torch_compile", True):
            logger.warning(
                "actor.use_torch_compile=true does not compile verl_tre's entropy terms: they run eagerly (hand-written "
                "chunked kernels; a compiled version would recompile for every new token count)."
            )
        # The entropy function verl calls; update_policy and compute_log_prob bind its region and whether its value
        # may carry gradient around their forward passes (_entropy_mode).
        self.compute_entropy_from_logits = functools.partial(self._entropy_columns, region=self.tre.region, needs_grad=False)
        if self.use_fused_kernels and not fused_forward.is_installed(actor_module):
            raise ValueError(
                "use_fused_kernels=true needs verl_tre's fused forward on the model: build the actor through verl's "
                "worker after verl_tre.plugin.install(), or call verl_tre.models.fused_forward.install_forward(model)"
            )

    def _entropy_columns(self, logits: torch.Tensor, region: TrustRegion, needs_grad: bool) -> torch.Tensor:
        """[..., V] temperature-scaled logits -> [..., C] fp32 columns (see column_names).

        region and needs_grad are arguments, bound into the function verl calls, and not actor state: verl's
        entropy_checkpointing re-runs the function in backward, after _entropy_mode has restored the state.
        """
        if not needs_grad:
            logits = logits.detach()
        with_stats = self.tre.metrics and region is not _FULL
        terms = _entropy_terms(logits, region, with_stats=with_stats, reference=self._reference)
        return terms_to_columns(terms)

    @contextmanager
    def _entropy_mode(self, region: TrustRegion, needs_grad: bool):
        saved = self.compute_entropy_from_logits
        self.compute_entropy_from_logits = functools.partial(self._entropy_columns, region=region, needs_grad=needs_grad)
        try:
            yield
        finally:
            self.compute_entropy_from_logits = saved

    def _forward_micro_batch(self, micro_batch, temperature, calculate_entropy=False):
        """verl's forward; with calculate_entropy, the entropy output is the [B, T, 5] columns."""
        if self.use_fused_kernels:
            return self._fused_forward_micro_batch(micro_batch, temperature, calculate_entropy)
        if not calculate_entropy:
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=False)
        # verl's padded path calls verl_F.entropy_from_logits directly instead of self.compute_entropy_from_logits.
        padded = not self.use_remove_padding
        patch = _swap_attr(verl_F, "entropy_from_logits", self.compute_entropy_from_logits) if padded else nullcontext()
        with patch:
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=True)

    def _fused_forward_micro_batch(self, micro_batch, temperature, calculate_entropy):
        """verl's fused-kernel branch (remove-padding, Ulysses or padded) with verl_tre's fused forward on the model:
        it returns the log-probs and the same entropy columns as _entropy_columns, computed from the hidden states and
        the lm_head weight without logits. Passes without entropy compute the full entropy only, as a by-product."""
        bound = self.compute_entropy_from_logits.keywords  # what _entropy_mode bound for this pass
        region = bound["region"] if calculate_entropy else _FULL
        head = fused_forward.FusedHead(
            region=region,
            reference=self._reference,
            with_stats=self.tre.metrics and region is not _FULL,
            value_needs_grad=calculate_entropy and bound["needs_grad"],
            columns=terms_to_columns,
            labels=self._ulysses_labels(micro_batch),
        )
        with fused_forward.active(head):
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=calculate_entropy)

    def _ulysses_labels(self, micro_batch):
        """Next-token ids of this rank's Ulysses slice, rolled before slicing as verl's unfused path does (a roll of
        the slice, which the model sees, would wrap at the slice's end); None without sequence parallelism."""
        if not (self.use_remove_padding and self.use_ulysses_sp):
            return None
        ids_rmpad, *_ = verl_dp_actor.unpad_input(micro_batch["input_ids"].unsqueeze(-1), micro_batch["attention_mask"])
        rolled = torch.roll(ids_rmpad.transpose(0, 1), shifts=-1, dims=1)
        sp_size = self.ulysses_sequence_parallel_size
        rolled, _, _ = verl_dp_actor.ulysses_pad_and_slice_inputs(rolled, position_ids_rmpad=None, sp_size=sp_size)
        return rolled

    @GPUMemoryLogger(role="dp actor", logger=logger)
    def compute_log_prob(self, data: DataProto, calculate_entropy=False):
        """verl's compute_log_prob; the entropy it returns is the full entropy, as verl's."""
        with self._entropy_mode(_FULL, needs_grad=False):
            log_probs, columns = super().compute_log_prob(data, calculate_entropy=calculate_entropy)
        return log_probs, (None if columns is None else columns[..., 1])

    def _micro_batches(self, mini_batch):
        if self.config.use_dynamic_bsz:
            max_token_len = self.config.ppo_max_token_len_per_gpu * self.ulysses_sequence_parallel_size
            return rearrange_micro_batches(batch=mini_batch, max_token_len=max_token_len)[0]
        return mini_batch.split(self.config.ppo_micro_batch_size_per_gpu)

    def _policy_gradient_loss(self, old_log_prob, log_prob, advantages, mask, loss_agg_mode=None):
        cfg = self.config
        loss_agg_mode = cfg.loss_agg_mode if loss_agg_mode is None else loss_agg_mode
        loss_mode = cfg.policy_loss.get("loss_mode", "vanilla")
        if loss_mode != "vanilla":
            return get_policy_loss_fn(loss_mode)(old_log_prob, log_prob, advantages, mask, loss_agg_mode, cfg)
        return compute_policy_loss(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=mask,
            cliprange=cfg.clip_ratio,
            cliprange_low=cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio,
            cliprange_high=cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio,
            clip_ratio_c=cfg.get("clip_ratio_c", 3.0),
            loss_agg_mode=loss_agg_mode,
        )

    def _forking_policy_loss(self, old_log_prob, log_prob, advantages, keep, response_mask):
        """Policy-gradient loss on the kept tokens, and the clip/KL metrics both over all response tokens (verl's
        names, as the reference reports them) and over the kept tokens.

        With loss_agg_mode=seq-mean-token-mean a sequence without kept tokens contributes nothing and the mean runs
        over the sequences that have some (verl's formula would give 0/0): the token weights keep / n_kept(row),
        summed per row and averaged over the rows with a kept token.
        """
        keep = keep.to(response_mask.dtype)
        if self.config.loss_agg_mode == "seq-mean-token-mean":
            kept_per_row = keep.sum(dim=-1, keepdim=True)
            rows_with_kept = (kept_per_row > 0).sum().clamp(min=1)
            weights = keep / kept_per_row.clamp(min=1)
            pg_loss = self._policy_gradient_loss(old_log_prob, log_prob, advantages, weights, "seq-mean-token-sum")[0]
            pg_loss = pg_loss * (keep.shape[0] / rows_with_kept)
            with torch.no_grad():
                kept = self._policy_gradient_loss(old_log_prob, log_prob, advantages, keep)[1:]
        else:
            pg_loss, *kept = self._policy_gradient_loss(old_log_prob, log_prob, advantages, keep)
        with torch.no_grad():
            everywhere = self._policy_gradient_loss(old_log_prob, log_prob, advantages, response_mask)[1:]
        return pg_loss, everywhere, kept

    def _mini_batch_forking_masks(self, micro_batches, temperature, multi_turn):
        """Forking selection over the whole mini-batch on all ranks (scope=mini_batch), from one no-grad forward:
        (one keep mask per micro-batch, the smallest kept entropy). Exactly the count is kept, ties included."""
        entropies, masks = [], []
        with torch.no_grad(), self._entropy_mode(_FULL, needs_grad=False):
            for mb in micro_batches:
                mb = mb.to(get_device_id())
                columns, _ = self._forward_micro_batch(mb, temperature=temperature, calculate_entropy=True)
                entropies.append(columns[..., 1])
                masks.append(_response_mask(mb, multi_turn))
        keep, threshold = forking_mini_batch_mask(torch.cat(entropies), torch.cat(masks), self.tre.forking_ratio)
        return list(keep.split([len(m) for m in masks])), threshold

    @GPUMemoryLogger(role="dp actor", logger=logger)
    def update_policy(self, data: DataProto):
        """One PPO update over ``data`` (ppo_epochs x mini-batches); returns verl-style metric lists."""
        if "multi_modal_inputs" in data.non_tensor_batch:
            raise NotImplementedError("verl_tre's actor supports text-only batches; multimodal inputs are not handled")
        self.actor_module.train()
        cfg, tre = self.config, self.tre
        temperature = data.meta_info["temperature"]
        multi_turn = data.meta_info.get("multi_turn", False)
        keys = ["responses", "input_ids", "attention_mask", "position_ids", "old_log_probs", "advantages"]
        keys += ["loss_mask"] if multi_turn else []
        keys += ["ref_log_prob"] if cfg.use_kl_loss else []
        mini_batches = data.select(batch_keys=keys).batch.split(cfg.ppo_mini_batch_size)
        grad_accum = None if cfg.use_dynamic_bsz else cfg.ppo_mini_batch_size // cfg.ppo_micro_batch_size_per_gpu
        kl_cov = cfg.policy_loss.get("loss_mode", "vanilla") == CLIPPED_KL_COV

        metrics = {}
        for _ in range(cfg.ppo_epochs):
            for mini_batch in mini_batches:
                micro_batches = self._micro_batches(mini_batch)
                keep_masks = threshold = None
                if tre.forking and tre.forking_scope == "mini_batch":
                    keep_masks, threshold = self._mini_batch_forking_masks(micro_batches, temperature, multi_turn)
                self.actor_optimizer.zero_grad()
                step = {}
                for index, mb in enumerate(micro_batches):
                    mb = mb.to(get_device_id())
                    response_mask = _response_mask(mb, multi_turn)
                    with self._entropy_mode(tre.region, needs_grad=tre.entropy_coeff != 0):
                        columns, log_prob = self._forward_micro_batch(mb, temperature=temperature, calculate_entropy=tre.needs_entropy_terms)

                    if tre.forking:
                        entropy_full = columns[..., 1]
                        if keep_masks is None:
                            keep = forking_token_mask(entropy_full, response_mask, tre.forking_ratio)
                        else:
                            keep = keep_masks[index].to(response_mask.device)
                        n_valid = response_mask.sum().clamp(min=1)
                        _add(step, "actor/forking_kept_frac", keep.sum() / n_valid)
                        kept_min = torch.where(keep, entropy_full, torch.inf).min() if threshold is None else threshold
                        _add(step, "actor/forking_threshold", kept_min)
                        pg_loss, (clipfrac, ppo_kl, clipfrac_lower), kept = self._forking_policy_loss(
                            mb["old_log_probs"], log_prob, mb["advantages"], keep, response_mask
                        )
                        for name, value in zip(("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), kept):
                            _add(step, f"actor/forking/{name}_kept", value)
                    else:
                        pg_loss, clipfrac, ppo_kl, clipfrac_lower = self._policy_gradient_loss(
                            mb["old_log_probs"], log_prob, mb["advantages"], response_mask
                        )
                    policy_loss = pg_loss
                    if tre.entropy_coeff != 0:
                        entropy_term = agg_loss(loss_mat=columns[..., 0], loss_mask=response_mask, loss_agg_mode=cfg.loss_agg_mode)
                        policy_loss = policy_loss - tre.entropy_coeff * entropy_term
                    if cfg.use_kl_loss:
                        kld = kl_penalty(logprob=log_prob, ref_logprob=mb["ref_log_prob"], kl_penalty=cfg.kl_loss_type)
                        kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=cfg.loss_agg_mode)
                        policy_loss = policy_loss + kl_loss * cfg.kl_loss_coef
                        _add(step, "actor/kl_loss", kl_loss)
                    if cfg.use_dynamic_bsz:
                        loss = policy_loss * (len(mb) / cfg.ppo_mini_batch_size)
                    else:
                        loss = policy_loss / grad_accum
                    loss.backward()

                    for name, value in (
                        ("pg_loss", pg_loss),
                        ("policy_loss", policy_loss),
                        ("pg_clipfrac", clipfrac),
                        ("ppo_kl", ppo_kl),
                        ("pg_clipfrac_lower", clipfrac_lower),
                    ):
                        _add(step, f"actor/{name}", value)
                    if kl_cov:
                        _add(step, "actor/kl_cov_tokens", kl_cov_token_count(response_mask, cfg.policy_loss.kl_cov_ratio))
                    if tre.metrics:
                        _add_region_metrics(step, columns, response_mask, region_metric_names(tre))

                grad_norm = self._optimizer_step()
                if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                    grad_norm = grad_norm.full_tensor()
                _add(step, "actor/grad_norm", grad_norm)
                # One host sync per mini-batch instead of one per metric and micro-batch.
                for name, values in step.items():
                    metrics.setdefault(name, []).extend(torch.stack([v.detach().float().cpu() for v in values]).tolist())
                if cfg.use_kl_loss:
                    metrics["actor/kl_coef"] = cfg.kl_loss_coef
        self.actor_optimizer.zero_grad()
        return metrics


def _response_mask(micro_batch, multi_turn: bool) -> torch.Tensor:
    response_length = micro_batch["responses"].size(1)
    source = micro_batch["loss_mask"] if multi_turn else micro_batch["attention_mask"]
    return source[:, -response_length:]


def _add(step: dict, name: str, value) -> None:
    step.setdefault(name, []).append(torch.as_tensor(value))


def column_names(tre: TREOptions) -> tuple:
    """Names of the entropy columns for these options: COLUMNS, then ``tail_mass_top{K}`` per reference K."""
    return COLUMNS + tuple(f"tail_mass_top{k}" for k in tre.reference_top_k)


def terms_to_columns(terms: EntropyTerms) -> torch.Tensor:
    """EntropyTerms ([...] fields, tail_mass [..., n_K]) -> [..., len(column_names)] columns, value first."""
    fixed = torch.stack([getattr(terms, name) for name in COLUMNS], dim=-1)
    return torch.cat([fixed, terms.tail_mass.to(fixed.dtype)], dim=-1)


def region_metric_names(tre: TREOptions) -> dict:
    """Column index -> logged metric name. ``actor/ref/*`` are the reference statistics, on the same regions for
    every method; ``actor/regularizer/*`` describe what this method trains (its region only where it has one)."""
    index = {name: i for i, name in enumerate(column_names(tre))}
    names = {index["value"]: "actor/regularizer/value"}
    if tre.region.mode != "full":
        names[index["region_mass"]] = "actor/regularizer/region_mass"
        names[index["region_size"]] = "actor/regularizer/region_size"
    names[index["entropy_full"]] = "actor/ref/entropy_full"
    names[index["top1_prob"]] = "actor/ref/top1_prob"
    for k in tre.reference_top_k:
        names[index[f"tail_mass_top{k}"]] = f"actor/ref/tail_mass_top{k}"
    if tre.reference_top_p is not None:
        names[index["nucleus_size"]] = f"actor/ref/nucleus_size_p{tre.reference_top_p}"
    return names


def _add_region_metrics(step: dict, columns: torch.Tensor, response_mask: torch.Tensor, names: dict) -> None:
    """Token means over the response of the detached entropy columns, under ``names`` (region_metric_names)."""
    columns = columns.detach()
    for index, name in names.items():
        _add(step, name, verl_F.masked_mean(columns[..., index], response_mask))


@contextmanager
def _swap_attr(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
