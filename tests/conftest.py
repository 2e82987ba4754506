"""Shared fixtures: tiny random models (2 layers, hidden 64: bitsandbytes 4-bit on CPU needs >= 64 inputs) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def default_dir() -> Path:
    from align.models.load import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer_dir(default_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(out)
    return out


def make_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, bias: bool = False) -> Path:
    """A 2-layer Llama with random weights and the SmolLM2 tokenizer/chat template, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_with_bias(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bias"), tokenizer_dir, bias=True)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_sft(tmp_path: Path) -> tuple[Path, Path]:
    """A learnable toy: every answer is 'blue' repeated; validation has the same pattern."""
    rows = [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                          {"role": "assistant", "content": "blue blue blue blue."}]} for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows[:20]), write_jsonl(tmp_path / "valid.jsonl", rows[20:])


def count_e(prompt: list, response: str) -> float:
    """A toy reward that varies even for a random model's gibberish (for smoke tests of RL stages)."""
    return response.count("e") / 10


def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster, and much faster on a shared 2-core machine."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    yield from _single_thread()
