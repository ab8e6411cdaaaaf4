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
