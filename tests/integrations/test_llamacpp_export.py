"""llama.cpp serving what align trained: a short LoRA SFT of the default model (SmolLM2-135M-Instruct) through the
CLI, `align export format=gguf gguf_type=f32`, and llama-cpp-python[server] (0.3.36, built by
tests/integrations/setup.sh) serving that GGUF on loopback.

For a few chat prompts rendered with the exported tokenizer's template, the server's tokens of the prompt and its
greedy answer are the token ids transformers gives on the exported safetensors: the tokenizer, BOS handling, chat
template, tensor names and the Q/K rotary permutation all have to be right for that, and f32 weights leave only
float rounding between the two runtimes (its size is measured on the chosen tokens' log-probabilities).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from align.cli import main

from .servers import call, free_port, serving, venv_python

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-sft"
NEW_TOKENS = 24
PROMPTS = [[{"role": "user", "content": "How should I store fresh basil?"}],
           [{"role": "user", "content": "Explain in a few sentences how a bicycle works."}],
           [{"role": "system", "content": "You are a poet."},
            {"role": "user", "content": "Write four lines about the sea."}],
           [{"role": "user", "content": "Write the numbers from one to five, then say why 'naïve' has two dots."}]]
SFT = ["train.max_steps=4", "train.batch_size=2", "data.max_length=96", "train.lr=1e-3", "train.eval_steps=4",
       "train.save_steps=4", "train.logging_steps=1", "train.progress=false", "dtype=float32"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export run folder (model/ safetensors, gguf/<MODEL>-f32.gguf) of a 4-step LoRA SFT of the default
    model, both made through the CLI."""
    python = venv_python("llamacpp")
    if isinstance(python, str):
        pytest.skip(python)
    tmp = tmp_path_factory.mktemp("llama-export")
    rows = [{"messages": [{"role": "user", "content": f"How should I store fresh herb number {i}?"},
                          {"role": "assistant", "content": "Stand the stems in a glass of water, like flowers."}]}
            for i in range(10)]
    for name, part in (("train.jsonl", rows[:8]), ("valid.jsonl", rows[8:])):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    start = time.monotonic()
    assert main(["sft", str(REPO / "stages" / "sft.yaml"), "model=default", f"output_dir={tmp / 'sft'}",
                 f"data.train={tmp / 'train.jsonl'}", f"data.validation={tmp / 'valid.jsonl'}", *SFT]) == 0
    sft_s = time.monotonic() - start
    assert main(["export", str(REPO / "stages" / "export.yaml"), f"run={tmp / 'sft'}", f"output_dir={tmp / 'export'}",
                 "format=gguf", "gguf_type=f32", f"name={MODEL}"]) == 0
    print(f"sft (4 steps) {sft_s:.1f} s, export {time.monotonic() - start - sft_s:.1f} s", file=sys.stderr)
    return tmp / "export"


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of llama.cpp's server on the exported GGUF."""
    python = venv_python("llamacpp")
    assert not isinstance(python, str)  # `exported` skipped already
    port = free_port()
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(exported / "gguf" / f"{MODEL}-f32.gguf"),
           "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
           "--n_threads", "2", "--logits_all", "true",
           # the KV cache in f32 too (llama.cpp's default is f16: it alone moves log-probabilities by ~3e-3)
           "--type_k", "0", "--type_v", "0"]
    with serving(cmd, f"http://127.0.0.1:{port}/v1/models", tmp_path_factory.mktemp("llama-log") / "server.log",
                 timeout=120):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def hf(exported: Path) -> tuple:
    """(tokenizer, model) of the exported safetensors, in plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported / "model"
    return (AutoTokenizer.from_pretrained(folder),
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def piece_ids(tokenizer, pieces: list[str]) -> list[int | None]:
    """The vocabulary id of each text piece llama.cpp returns for a generated token (byte-level BPE: the piece's
    UTF-8 bytes spelled in the tokenizer's byte alphabet); None where a piece is not one vocabulary entry."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    vocab = tokenizer.get_vocab()
    return [vocab.get("".join(alphabet[b] for b in piece.encode())) for piece in pieces]


def first_divergence(a: list, b: list) -> int | None:
    """The first position where the two sequences differ (the shorter one's length when one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_the_gguf_says_what_the_tokenizer_does(exported: Path, hf: tuple):
    import gguf

    tokenizer, _ = hf
    fields = gguf.GGUFReader(exported / "gguf" / f"{MODEL}-f32.gguf").fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # SmolLM2's tokenizer adds no BOS
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template


def test_llama_cpp_tokenizes_prompts_like_transformers(server: str, hf: tuple):
    tokenizer, _ = hf
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        got = call(f"{server}/extras/tokenize", {"input": text, "model": MODEL})["tokens"]
        assert got == expected, f"{messages[-1]['content']!r}: first difference at {first_divergence(got, expected)}"


def test_greedy_tokens_equal_transformers(server: str, hf: tuple):
    """For each prompt: llama.cpp's greedy answer (completions endpoint, temperature 0, no repeat penalty) is the
    token ids of transformers' greedy generate; the chat endpoint, rendering the GGUF's own chat template, gives
    the same text."""
    tokenizer, model = hf
    report, worst, compared = [], 0.0, 0
    start = time.monotonic()
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(ids):].tolist()
        hf_logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, expected)]
        if expected[-1] == tokenizer.eos_token_id:  # llama.cpp stops at EOS without returning it
            expected, hf_logprobs = expected[:-1], hf_logprobs[:-1]
        sampling = {"model": MODEL, "max_tokens": NEW_TOKENS, "temperature": 0.0, "top_k": 1,
                    "repeat_penalty": 1.0, "seed": 0}
        answer = call(f"{server}/v1/completions", {"prompt": text, "logprobs": 1, **sampling})
        choice = answer["choices"][0]
        got = piece_ids(tokenizer, choice["logprobs"]["tokens"])
        assert answer["usage"]["prompt_tokens"] == len(ids)
        assert (choice["finish_reason"] == "stop") == (len(expected) < NEW_TOKENS)
        where = first_divergence(got, expected)
        report.append((messages[-1]["content"], where, tokenizer.decode(expected)))
        compared += len(expected)
        if where is None:
            worst = max([worst, *(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], hf_logprobs))])
            chat = call(f"{server}/v1/chat/completions", {"messages": messages, **sampling})
            assert chat["choices"][0]["message"]["content"] == choice["text"] == tokenizer.decode(expected)
    for prompt, where, answer in report:
        print(f"{prompt!r}: {'equal' if where is None else f'first divergence at token {where}'}: {answer!r}",
              file=sys.stderr)
    print(f"{len(PROMPTS)} prompts, {compared} answer tokens in {time.monotonic() - start:.1f} s; largest |log-prob "
          f"difference| of a chosen token {worst:.2e}", file=sys.stderr)
    assert all(where is None for _, where, _ in report), report
    assert compared >= 2 * NEW_TOKENS  # answers long enough to compare (EOS ends some early)
    assert worst < 2e-4  # f32 weights and KV cache: rounding (measured 1.5e-5), not a wrong weight
