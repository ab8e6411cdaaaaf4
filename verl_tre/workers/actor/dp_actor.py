"""verl's data-parallel PPO actor with trust-region entropy, Forking Tokens and the paper's KL-Cov.

The forward pass stays verl's (remove-padding, Ulysses sequence parallelism, padded path): the actor only swaps the
entropy function it calls for one that returns, per token, five columns computed in one pass over the logits:

    [value, entropy_full, region_mass, region_size, topk_prob]

(``value`` is the configured regularizer and the only column with gradient). verl pads, gathers and slices those
columns like its own entropy (with use_fused_kernels the model's fused forward, verl_tre/models/fused_forward.py,
returns the same columns from the hidden states and the lm_head weight, without logits). ``update_policy`` then
composes

    policy_loss = pg_loss(tokens kept by the Forking mask, if on) - entropy_coeff * agg(value) [+ kl_loss]

and logs what the regularizer did (see ``TREOptions`` for the config keys).
"""

from __future__ import annotations

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
from verl_tre.trainer.ppo.core_algos import CLIPPED_KL_COV, forking_threshold, forking_token_mask, kl_cov_token_count
from verl_tre.utils.torch_functional import TrustRegion, _entropy_terms
from verl_tre.workers.actor.options import TREOptions

__all__ = ["TREDataParallelPPOActor", "COLUMNS"]

logger = logging.getLogger(__file__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

COLUMNS = ("value", "entropy_full", "region_mass", "region_size", "topk_prob")
_FULL = TrustRegion()


class TREDataParallelPPOActor(DataParallelPPOActor):
    """DataParallelPPOActor whose entropy term is full entropy, TRE-K or TRE-P, with Forking Tokens and KL-Cov."""

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        self.tre = TREOptions.from_actor_config(config)
        # The region the entropy columns use, and whether their value may carry gradient; update_policy and
        # compute_log_prob set these around their forward passes.
        self._region = self.tre.region
        self._value_needs_grad = False
        self.compute_entropy_from_logits = self._entropy_columns
        if self.use_fused_kernels and not fused_forward.is_installed(actor_module):
            raise ValueError(
                "use_fused_kernels=true needs verl_tre's fused forward on the model: build the actor through verl's "
                "worker after verl_tre.plugin.install(), or call verl_tre.models.fused_forward.install_forward(model)"
            )

    def _entropy_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] temperature-scaled logits -> [..., 5] fp32 columns (see COLUMNS)."""
        if not self._value_needs_grad:
            logits = logits.detach()
        with_stats = self.tre.metrics and self._region is not _FULL
        terms = _entropy_terms(logits, self._region, stats_top_k=self.tre.metrics_top_k, with_stats=with_stats)
        return torch.stack(terms, dim=-1)

    @contextmanager
    def _entropy_mode(self, region: TrustRegion, needs_grad: bool):
        saved = self._region, self._value_needs_grad
        self._region, self._value_needs_grad = region, needs_grad
        try:
            yield
        finally:
            self._region, self._value_needs_grad = saved

    def _forward_micro_batch(self, micro_batch, temperature, calculate_entropy=False):
        """verl's forward; with calculate_entropy, the entropy output is the [B, T, 5] columns."""
        if self.use_fused_kernels:
            return self._fused_forward_micro_batch(micro_batch, temperature, calculate_entropy)
        if not calculate_entropy:
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=False)
        # verl's padded path calls verl_F.entropy_from_logits directly instead of self.compute_entropy_from_logits.
        patch = _swap_attr(verl_F, "entropy_from_logits", self._entropy_columns) if not self.use_remove_padding else nullcontext()
        with patch:
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=True)

    def _fused_forward_micro_batch(self, micro_batch, temperature, calculate_entropy):
        """verl's fused-kernel branch (remove-padding, Ulysses or padded) with verl_tre's fused forward on the model:
        it returns the log-probs and the same entropy columns as _entropy_columns, computed from the hidden states and
        the lm_head weight without logits. Passes without entropy compute the full entropy only, as a by-product."""
        region = self._region if calculate_entropy else _FULL
        head = fused_forward.FusedHead(
            region=region,
            stats_top_k=self.tre.metrics_top_k,
            with_stats=self.tre.metrics and region is not _FULL,
            value_needs_grad=calculate_entropy and self._value_needs_grad,
            columns=_stack_columns,
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

    def _policy_gradient_loss(self, old_log_prob, log_prob, advantages, mask):
        cfg = self.config
        loss_mode = cfg.policy_loss.get("loss_mode", "vanilla")
        if loss_mode != "vanilla":
            return get_policy_loss_fn(loss_mode)(old_log_prob, log_prob, advantages, mask, cfg.loss_agg_mode, cfg)
        return compute_policy_loss(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=mask,
            cliprange=cfg.clip_ratio,
            cliprange_low=cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio,
            cliprange_high=cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio,
            clip_ratio_c=cfg.get("clip_ratio_c", 3.0),
            loss_agg_mode=cfg.loss_agg_mode,
        )

    def _mini_batch_forking_threshold(self, micro_batches, temperature, multi_turn):
        """Forking threshold over the whole mini-batch on all ranks (scope=mini_batch): one no-grad forward."""
        entropies, masks = [], []
        with torch.no_grad(), self._entropy_mode(_FULL, needs_grad=False):
            for mb in micro_batches:
                mb = mb.to(get_device_id())
                columns, _ = self._forward_micro_batch(mb, temperature=temperature, calculate_entropy=True)
                entropies.append(columns[..., 1].flatten())
                masks.append(_response_mask(mb, multi_turn).flatten())
        return forking_threshold(torch.cat(entropies), torch.cat(masks), self.tre.forking_ratio)

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
                threshold = None
                if tre.forking and tre.forking_scope == "mini_batch":
                    threshold = self._mini_batch_forking_threshold(micro_batches, temperature, multi_turn)
                self.actor_optimizer.zero_grad()
                step = {}
                for mb in micro_batches:
                    mb = mb.to(get_device_id())
                    response_mask = _response_mask(mb, multi_turn)
                    with self._entropy_mode(tre.region, needs_grad=tre.entropy_coeff != 0):
                        columns, log_prob = self._forward_micro_batch(mb, temperature=temperature, calculate_entropy=tre.needs_entropy_terms)

                    pg_mask = response_mask
                    if tre.forking:
                        entropy_full = columns[..., 1]
                        if threshold is None:
                            keep = forking_token_mask(entropy_full, response_mask, tre.forking_ratio)
                        else:
                            keep = response_mask.bool() & (entropy_full >= threshold)
                        pg_mask = keep.to(response_mask.dtype)
                        n_valid = response_mask.sum().clamp(min=1)
                        _add(step, "actor/forking_kept_frac", keep.sum() / n_valid)
                        kept_min = torch.where(keep, entropy_full, torch.inf).min() if threshold is None else threshold
                        _add(step, "actor/forking_threshold", kept_min)

                    pg_loss, clipfrac, ppo_kl, clipfrac_lower = self._policy_gradient_loss(
                        mb["old_log_probs"], log_prob, mb["advantages"], pg_mask
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
                        _add(step, "actor/kl_cov_tokens", kl_cov_token_count(pg_mask, cfg.policy_loss.kl_cov_ratio))
                    if tre.metrics:
                        _add_region_metrics(step, columns, response_mask)

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


def _add_region_metrics(step: dict, columns: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Token means over the response of the detached entropy columns."""
    columns = columns.detach()
    for index, name in ((1, "entropy_full"), (0, "tre_value"), (2, "region_mass"), (3, "region_size"), (4, "topk_prob")):
        _add(step, f"actor/{name}", verl_F.masked_mean(columns[..., index], response_mask))
    _add(step, "actor/tail_mass", verl_F.masked_mean(1.0 - columns[..., 2], response_mask))


def _stack_columns(terms) -> torch.Tensor:
    """EntropyTerms of [M] tensors -> [M, F] columns, in field order (the layout _entropy_columns returns)."""
    return torch.stack(tuple(terms), dim=-1)


@contextmanager
def _swap_attr(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
