"""The model side of verl_tre's fused lm-head path (``actor_rollout_ref.model.use_fused_kernels=true``).

verl 0.4.1's worker calls ``patch_forward_with_backends`` (verl/models/transformers/monkey_patch.py) on the actor
and reference models; with use_fused_kernels it replaces the model class's forward by one that returns per-token
log-probs and the full entropy only. ``verl_tre.plugin.install()`` puts ``patch_forward_with_backends`` below in
its place, so verl's fused forward is never installed. Ours wraps the model instance's forward instead: while the
actor holds a ``FusedHead`` active (``with active(head):``) the forward runs the decoder, then
``fused_linear_entropy_terms`` on the final hidden states and the lm_head weight, and returns the log-probs and
the actor's entropy columns in verl's fused output fields (``log_probs`` [B, S], ``entropy`` [B, S, F]); at any
other time (HF rollout's generate, plain calls) it is the model's own forward, with logits.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from verl.models.transformers.dense_common import CausalLMOutputForPPO

from verl_tre.utils.torch_functional import EntropyTerms, TrustRegion, _fused_linear_entropy_terms, _Reference

__all__ = ["FusedHead", "active", "install_forward", "is_installed", "patch_forward_with_backends"]

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("verl_tre_fused_head", default=None)
_MARK = "_verl_tre_fused_forward"


@dataclass(frozen=True)
class FusedHead:
    """What the fused forward computes after the decoder.

    region / with_stats: as entropy_terms; reference: the reference regions of the logged statistics.
    value_needs_grad: False detaches the value column.
    columns: EntropyTerms of [M] tensors -> [M, F] columns (the actor's layout).
    labels: next-token ids shaped like the model's input_ids; None rolls input_ids by one (verl's labels; with
        Ulysses the actor passes its rank's slice of the globally rolled ids instead).
    """

    region: TrustRegion
    reference: _Reference
    with_stats: bool
    value_needs_grad: bool
    columns: Callable[[EntropyTerms], torch.Tensor]
    labels: Optional[torch.Tensor] = None


@contextmanager
def active(head: FusedHead):
    """Makes model forwards inside the block compute ``head`` (per thread/context)."""
    token = _ACTIVE.set(head)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_installed(module: torch.nn.Module) -> bool:
    """Whether ``module`` or one of its submodules has the fused forward (an FSDP or PEFT wrapper's inner model)."""
    return any(getattr(m, _MARK, False) for m in module.modules())


def install_forward(model: torch.nn.Module) -> None:
    """Wraps ``model.forward`` (a causal LM with ``.model`` decoder and an lm_head) for the fused path. Idempotent."""
    if getattr(model, _MARK, False):
        return
    original = model.forward

    def forward(*args, **kwargs):
        head = _ACTIVE.get()
        if head is None:
            return original(*args, **kwargs)
        return _fused_forward(model, head, *args, **kwargs)

    model.forward = forward
    setattr(model, _MARK, True)


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: Optional[str] = None):
    """Stands in for verl 0.4.1's function of this name: the fused path is verl_tre's whatever the backend."""
    if use_fused_kernels:
        install_forward(model)
        print(f"verl_tre: fused lm-head path (log-probs, TRE and statistics without logits) for {type(model).__name__}")


def _fused_forward(model, head: FusedHead, input_ids=None, attention_mask=None, position_ids=None,
                   temperature: float = 1.0, use_cache=False, return_dict=True, **kwargs):
    decoder_out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, return_dict=True, **kwargs)
    hidden = decoder_out.last_hidden_state
    weight = model.get_output_embeddings().weight
    device = hidden.device.type
    # The same operands the lm_head would multiply: under autocast, both in the autocast dtype.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    labels = head.labels if head.labels is not None else torch.roll(input_ids, shifts=-1, dims=-1)
    log_probs, terms = _fused_linear_entropy_terms(
        hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype), labels.reshape(-1), head.region,
        temperature=temperature, with_stats=head.with_stats, reference=head.reference,
    )
    if not head.value_needs_grad:
        terms = terms._replace(value=terms.value.detach())
    lead = hidden.shape[:-1]
    columns = head.columns(terms)
    return CausalLMOutputForPPO(
        log_probs=log_probs.reshape(lead),
        entropy=columns.reshape(*lead, *columns.shape[1:]),
        hidden_states=decoder_out.hidden_states,
        attentions=decoder_out.attentions,
    )
