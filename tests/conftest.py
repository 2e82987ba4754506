"""Shared fixtures: tiny random models (2 layers, hidden 64: bitsandbytes 4-bit on CPU needs >= 64 inputs) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from align.bench.tiny import make_tiny_model

# The suite never reaches the Hub (align itself no longer forces offline mode; tests/test_hub.py covers both).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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


TARGET = "blue"  # the word the toy policy says now and then (PPO and online RLAIF reinforce it)
REPO = Path(__file__).resolve().parent.parent


def make_toy_policy(out: Path, tokenizer_dir: Path, target_prob: float = 0.05) -> Path:
    """A random tiny model that says ' blue' now and then, so PPO has something to reinforce.

    A random model spreads its probability over 49k tokens (no token is ever sampled twice), so we (1) untie and
    scale up the LM head, which makes each context prefer a few tokens, and (2) point the ' blue' row of the head
    along the mean final hidden state, scaled so ' blue' gets about `target_prob` of the mass on average: the
    target is then reachable from every context and a small adapter change can make it more likely.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.records import read_prompts
    from align.generation import SamplingSettings
    from align.generation.hf import HFSampler

    make_tiny_model(out, tokenizer_dir, seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.config.tie_word_embeddings = False
    gen = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.6)
    prompts = [r.prompt for r in read_prompts(REPO / "data/prompts/train.jsonl")[:16]]
    samples = HFSampler(model, tok).generate(prompts, SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=12,
                                                                       batch_size=16))
    hidden = []
    with torch.no_grad():
        for (s,) in samples:
            out_ = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids]), output_hidden_states=True)
            hidden.append(out_.hidden_states[-1][0, len(s.prompt_ids) - 1:])
        h = torch.cat(hidden)  # [positions, hidden]
        direction = h.mean(0) / h.mean(0).norm()
        target = tok.encode(" " + TARGET, add_special_tokens=False)[0]
        lo, hi = 0.0, 30.0
        for _ in range(30):  # bisect the scale that gives the target `target_prob` on average
            model.lm_head.weight[target] = (lo + hi) / 2 * direction
            p = torch.softmax(h @ model.lm_head.weight.T, -1)[:, target].mean()
            lo, hi = ((lo + hi) / 2, hi) if p < target_prob else (lo, (lo + hi) / 2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_policy(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_toy_policy(tmp_path_factory.mktemp("toy_policy"), tokenizer_dir)
    finally:
        torch.set_num_threads(n)
