"""Prepacked weights for sampling on a CPU (align/models/prepacked.py): the same numbers as nn.Linear to rounding,
the same greedy tokens as plain `generate`, and used only where they measured faster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.models.prepacked import PrepackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this torch build has no oneDNN")

PROMPTS = [[{"role": "user", "content": "hi"}],
           [{"role": "user", "content": "Name three colours and say which one you like best, please."}],
           [{"role": "user", "content": "What colour is the sky?"}]]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (3, 5, 48), (300, 48)])
def test_prepacked_linear_is_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 96, bias=bias)
    x = torch.randn(*shape)
    packed = PrepackedLinear(linear)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed(x).shape == (*shape[:-1], 96)


def test_prepacked_linear_in_bf16_where_the_cpu_has_it() -> None:
    if not can_prepack(torch.bfloat16):
        pytest.skip("no bf16 in oneDNN on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = PrepackedLinear(linear)(x), linear(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)  # bf16 rounding of the outputs
    assert not can_prepack(torch.float16)


def test_prepack_linears_replaces_every_linear_and_keeps_the_logits(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 200, 17, 3], [4, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert prepack_linears(model) == linears > 0
        after = model(input_ids=ids).logits
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.get_input_embeddings().weight.shape[0] == before.shape[-1]  # a tied embedding keeps its weights
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def plain_greedy(model, tokenizer, eos_ids: set[int], new_tokens: int) -> list[list[int]]:
    from align.generation.hf import chat_prompt_ids

    batch = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    width, pad = max(len(ids) for ids in batch), tokenizer.pad_token_id
    out = model.generate(input_ids=torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch]),
                         attention_mask=torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch]),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=list(eos_ids))
    rows = out[:, width:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_sampler_on_prepacked_weights_gives_plain_greedy_tokens(which: str, tiny_model: Path, default_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """build_sampler prepacks (made to measure faster here); its greedy answers are plain `generate`'s on the
    unpacked model: the default model's real answers and the tiny model's random ones."""
    from transformers import AutoModelForCausalLM

    from align.generation import SamplingSettings
    from align.generation.select import BackendSettings, build_sampler
    from align.models import prepacked

    monkeypatch.setattr(prepacked, "prepacking_is_faster", lambda dtype: True)
    path = tiny_model if which == "tiny" else default_dir
    sampler = build_sampler(path, BackendSettings(backend="hf", dtype="float32"), verbose=False)
    assert any(isinstance(m, PrepackedLinear) for m in sampler.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in sampler.model.modules())
    got = sampler.generate(PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=16, batch_size=3))
    want = plain_greedy(AutoModelForCausalLM.from_pretrained(path).eval(), sampler.tokenizer, sampler.eos_ids, 16)
    assert [s.response_ids for (s,) in got] == want
    assert len({len(r) for r in want}) > 1 or which == "tiny"  # the real model's answers end at different lengths


def test_prepacking_follows_a_measurement_made_once(tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from align.generation.select import BackendSettings, build_sampler
    from align.models import load

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    timings = {False: 0.02, True: 0.05}  # prepacked measured slower on this "CPU"
    calls: list[bool] = []
    monkeypatch.setattr(load, "time_decode_step",
                        lambda dtype, prepacked=False: calls.append(prepacked) or timings[prepacked])

    def prepacked_layers() -> int:
        model = build_sampler(tiny_model, BackendSettings(backend="hf", dtype="float32"), verbose=False).model
        return sum(isinstance(m, PrepackedLinear) for m in model.modules())

    assert prepacked_layers() == 0 and prepacked_layers() == 0
    assert calls == [False, True]  # measured once, then remembered
    entry = next(v for k, v in json.loads((tmp_path / "dtype_probe.json").read_text()).items()
                 if k.endswith("prepacked decode float32 v1"))
    assert entry["faster"] == "F.linear"
    (tmp_path / "dtype_probe.json").unlink()
    timings[True] = 0.01
    assert prepacked_layers() > 0

