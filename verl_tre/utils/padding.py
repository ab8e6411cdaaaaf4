"""Plain-torch versions of the flash-attn padding helpers verl's remove-padding path imports.

verl 0.4.1 imports ``unpad_input``, ``pad_input``, ``index_first_axis`` and ``rearrange`` from flash_attn only
when CUDA is present; on a CPU these stand in for them (same signatures and results).
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["index_first_axis", "unpad_input", "pad_input", "rearrange"]


def index_first_axis(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values[indices] along the first axis: [N, ...] x [M] -> [M, ...]."""
    return values.index_select(0, indices)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """Drops padding: [B, S, ...] with a [B, S] 0/1 mask -> (packed [nnz, ...], indices [nnz] into B*S,
    cu_seqlens [B + 1] int32, max_seqlen int, seqlens [B] int32), as flash_attn.bert_padding.unpad_input."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, int(seqlens.max().item()) if seqlens.numel() else 0, seqlens


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: [nnz, ...] -> [batch, seqlen, ...] with zeros at the padding."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
