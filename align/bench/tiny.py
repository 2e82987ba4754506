"""A tiny random model for `python -m align.bench --tiny` (the same shape as the tests' tiny model)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with random weights and the given tokenizer/chat template, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
