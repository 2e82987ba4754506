"""A tiny random model for `python -m align.bench --tiny` (the same shape as the tests' tiny model)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, bias: bool = False, hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer Llama with random weights and the given tokenizer/chat template, saved as safetensors: the tiny
    model of the tests (hidden 64; bitsandbytes 4-bit on CPU needs >= 64 inputs), `--tiny` benches and the GPU
    check (hidden 128 with 2 heads: head_dim 64, which every attention kernel accepts)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
