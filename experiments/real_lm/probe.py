"""The paper's argument in one number per run: how much probability the policy puts where the base model did not.

On the held-out prompts, the base model's greedy continuations fix a set of positions (prompt and continuation so
far); at each, the base model's top ``TOP_K`` tokens are what it considered plausible. A trained policy's mass
outside that set, token-averaged over all positions, is its "implausible mass"; the base model's own value is the
same number before training. ``build_base_probe`` writes the positions and sets once (``probe_base.pt``);
``probe_run`` reads a run's final weights and returns its value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROBE_FILE = "probe.json"
TOP_K = 10
BATCH = 16


def _torch_threads():
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch


def _load_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_threads().float32).eval()


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """Prompt ids as verl's RLHFDataset makes them: the chat template with the generation prompt, then the text
    tokenized without added special tokens."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_continuations(model, tokenizer, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuation ids of each prompt (left-padded batches), up to and including the first eos."""
    torch = _torch_threads()
    out = []
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        width = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return out


def _position_logits(model, sequences: list[tuple[list[int], list[int]]]):
    """For each (prompt, continuation), the logits [len(continuation), V] that predict each continuation token."""
    torch = _torch_threads()
    for start in range(0, len(sequences), BATCH):
        batch = sequences[start : start + BATCH]
        full = [p + c for p, c in batch]
        width = max(map(len, full))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in full])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in full])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (p, c) in zip(logits, batch):
            yield row[len(p) - 1 : len(p) - 1 + len(c)]


def build_base_probe(model_dir: str | Path, test_parquet: Path, max_new: int, out: Path) -> dict:
    """Greedy continuations of the held-out prompts under the base model and its top-TOP_K set at every position;
    saved to ``out`` (a torch file). Returns a summary: prompts, positions, the base model's own mass outside."""
    import pandas as pd
    torch = _torch_threads()

    from verl_tre.utils.torch_functional import mass_outside

    from transformers import AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(str(model_dir)), _load_model(model_dir)
    rows = pd.read_parquet(test_parquet).to_dict("records")
    prompts = [chat_prompt_ids(tokenizer, row["prompt"]) for row in rows]
    continuations = greedy_continuations(model, tokenizer, prompts, max_new)
    sequences = [(p, c) for p, c in zip(prompts, continuations) if c]
    tops, masses = [], []
    for logits in _position_logits(model, sequences):
        top = torch.topk(logits.float(), TOP_K, dim=-1).indices
        tops.append(top)
        masses.append(mass_outside(logits, top))
    probe = {"sequences": sequences, "top": tops, "top_k": TOP_K, "model": str(model_dir)}
    tmp = out.with_suffix(".tmp")
    torch.save(probe, tmp)
    tmp.replace(out)
    mass = torch.cat(masses)
    return {"prompts": len(rows), "positions": int(mass.numel()), "top_k": TOP_K,
            "base_mass_outside": float(mass.mean())}


def probe_run(weights: Path, probe_file: Path) -> dict:
    """The policy at ``weights`` on the base probe: token-mean mass outside the base model's top-k sets."""
    torch = _torch_threads()

    from verl_tre.utils.torch_functional import mass_outside

    probe = torch.load(probe_file, weights_only=False)
    model = _load_model(weights)
    masses = [mass_outside(logits, top) for logits, top in zip(_position_logits(model, probe["sequences"]), probe["top"])]
    base = json.loads((probe_file.parent / "base_probe.json").read_text())
    return {"mass_outside": float(torch.cat(masses).mean()), "top_k": probe["top_k"],
            "positions": int(sum(m.numel() for m in masses)), "base_mass_outside": base["base_mass_outside"]}


def write_result(run_dir: Path, result: dict) -> None:
    tmp = run_dir / (PROBE_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(run_dir / PROBE_FILE)
