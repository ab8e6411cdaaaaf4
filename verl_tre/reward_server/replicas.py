"""Model replicas: one copy of the reward model per device, each scoring padded batches of token ids."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_devices(spec: str) -> list[torch.device]:
    """'auto' -> every visible GPU, else the CPU; 'cpu'; or 'cuda:0,cuda:1' (checked against what is visible)."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return [torch.device("cpu")]
    if spec == "auto":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [torch.device(name) for name in spec.split(",")]
    visible = torch.cuda.device_count()
    for device in devices:
        if device.index >= visible:
            raise ValueError(
                f"device {device} is not visible ({visible} GPU(s)); check --devices and CUDA_VISIBLE_DEVICES")
    return devices


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU and fp32 on the CPU, where bf16 matmuls are slow and less exact."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


class Replica:
    """A reward model on one device. ``score`` takes lists of token ids and returns one float per list,
    the scalar head read on each sequence's last token (right padding, explicit attention mask)."""

    def __init__(self, model, device: torch.device, pad_id: int):
        self.model = model
        self.device = device
        self.pad_id = pad_id

    @classmethod
    def load(cls, path, device: torch.device, dtype: torch.dtype, attn_implementation: str) -> "Replica":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(
                f"{path} is not a scalar reward model: expected a sequence-classification model with a 'score' "
                "head and num_labels=1 (train one with experiments/hh/reward/train_reward_model.py)"
            )
        pad_id = model.config.pad_token_id
        model.to(device).eval()
        log.info("loaded %s on %s as %s", path, device, dtype)
        return cls(model, device, 0 if pad_id is None else pad_id)

    @torch.inference_mode()
    def score(self, batch: list[list[int]]) -> list[float]:
        lengths = torch.tensor([len(ids) for ids in batch])
        width = int(lengths.max())
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        input_ids[mask] = torch.tensor([t for ids in batch for t in ids], dtype=torch.long)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Run the backbone and apply the head to the last real token only: cheaper than scoring every
        # position, and immune to pad-id tokens inside the text (the model's own pooling searches for them).
        output = self.model.base_model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
        hidden = output.last_hidden_state
        last = hidden[torch.arange(len(batch), device=self.device), (lengths - 1).to(self.device)]
        return self.model.score(last).float().squeeze(-1).cpu().tolist()

    def prefill(self, ids: list[int], chunk_tokens: int) -> "Prefill":
        """A stepwise scorer of one long sequence, ``chunk_tokens`` at a time (see :class:`Prefill`)."""
        return Prefill(self, ids, chunk_tokens)


class Prefill:
    """Scores one sequence in chunks through the model's KV cache: each :meth:`step` runs the next
    ``chunk_tokens`` tokens and returns None, the last one returns the reward. Equal to one full forward
    (causal attention: a token sees the same keys either way), but each step is a short forward pass, so
    other batches can run between the steps."""

    def __init__(self, replica: Replica, ids: list[int], chunk_tokens: int):
        self.replica, self.ids, self.chunk_tokens = replica, ids, chunk_tokens
        self.done_tokens = 0
        self.cache = None

    def step(self) -> float | None:
        from transformers import DynamicCache

        replica = self.replica
        piece = self.ids[self.done_tokens:self.done_tokens + self.chunk_tokens]
        with torch.inference_mode():  # per step: steps may run on different threads
            if self.cache is None:
                self.cache = DynamicCache()
            input_ids = torch.tensor([piece], dtype=torch.long, device=replica.device)
            output = replica.model.base_model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
            self.cache = output.past_key_values
            self.done_tokens += len(piece)
            if self.done_tokens < len(self.ids):
                return None
            reward = replica.model.score(output.last_hidden_state[0, -1]).float().item()
        self.cache = None  # free the device memory at once
        return reward
