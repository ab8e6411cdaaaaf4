"""Tiny GGUF files for the tests: a Hugging Face Llama model and its tokenizer written the way llama.cpp's
converter writes SmolLM2-135M-Instruct (F32 tensors instead of Q4_1), so that transformers' GGUF loader reads them
back through the same code path as the real file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from verl_tre.utils.local_assets import IM_END, IM_START, PAD_TOKEN


def _interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q/k projection: per head, the two rotary halves interleaved row by row (HF keeps
    them as two blocks); transformers' loader undoes exactly this."""
    rows = weight.shape[0]
    per_head = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weight.shape))


def _merges(tokenizer) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_llama_gguf(model, tokenizer, path: Path, *, bos_token: str = IM_START, eos_token: str = IM_END,
                     pad_token: str = IM_END, unk_token: str = PAD_TOKEN) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as a GGUF file at ``path``.

    The special-token ids are SmolLM2's layout (bos <|im_start|>, eos and pad <|im_end|>, unk <|endoftext|>);
    tied embeddings are written as llama.cpp does, without an ``output.weight`` tensor.
    """
    import gguf

    config = model.config
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) != config.vocab_size:
        raise ValueError(f"the tokenizer's ids must be 0..{config.vocab_size - 1}, one per embedding row")
    special = set(tokenizer.all_special_tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(vocab[bos_token])
    writer.add_eos_token_id(vocab[eos_token])
    writer.add_unk_token_id(vocab[unk_token])
    writer.add_pad_token_id(vocab[pad_token])
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        weight = tensor.detach().float().numpy()
        if stem.endswith("self_attn.q_proj"):
            weight = _interleave_rotary_halves(weight, config.num_attention_heads)
        elif stem.endswith("self_attn.k_proj"):
            weight = _interleave_rotary_halves(weight, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def end_of_turn_model(tokenizer, **shape):
    """A tiny Llama (tiny_llama_model) whose next token is <|im_end|> at every position with probability ~1.

    Residual dimension 0 carries a positive constant from every input embedding (1, and 20 for <|im_end|>) that no
    layer writes to; through the tied lm_head that row's 20 beats every other token's 1 by about 100 logits after
    the final norm, whatever the rest of the random weights do.
    """
    import torch

    from verl_tre.utils.local_assets import tiny_llama_model

    model = tiny_llama_model(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, 0] = 1.0
        embedding[tokenizer.convert_tokens_to_ids(IM_END), 0] = 20.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
    return model
