"""Sampling: the hf backend on a tiny model, backend selection, and the resumable generate stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from align.config import load_config
from align.errors import AlignError, ConfigError, DataError, ModelError
from align.generation import SamplingSettings
from align.generation.select import BackendSettings, build_sampler, choose_backend

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "How long do I boil an egg so the yolk stays soft but the white sets?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Salt or sugar for tomatoes?"}]]


@pytest.fixture(scope="module")
def sampler(tiny_model: Path):
    return build_sampler(tiny_model, BackendSettings(backend="hf", dtype="float32"), verbose=False)


def test_hf_sampler_returns_n_samples_per_prompt(sampler) -> None:
    from align.generation.hf import chat_prompt_ids

    out = sampler.generate(PROMPTS, SamplingSettings(temperature=1.0, max_new_tokens=6, batch_size=4), n=3)
    assert [len(s) for s in out] == [3, 3, 3]
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            assert s.prompt_ids == chat_prompt_ids(sampler.tokenizer, prompt)
            assert 1 <= len(s.response_ids) <= 6
            assert s.finished == (s.response_ids[-1] in sampler.eos_ids)
            assert s.text == sampler.tokenizer.decode(s.response_ids, skip_special_tokens=True).strip()


def test_left_padded_batch_matches_one_by_one_greedy(sampler) -> None:
    params = SamplingSettings(temperature=0.0, max_new_tokens=10, batch_size=8)
    batched = sampler.generate(PROMPTS, params, n=2)
    for prompt, samples in zip(PROMPTS, batched):
        alone = sampler.generate([prompt], params, n=1)[0][0]
        assert samples[0].response_ids == alone.response_ids == samples[1].response_ids


def test_backend_selection() -> None:
    import importlib.util

    import torch

    expected = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    assert choose_backend("auto") == expected
    assert choose_backend("hf") == "hf"
    with pytest.raises(ConfigError, match="not one of"):
        choose_backend("tgi")


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ModelError, match=r"\[vllm\]"):
        build_sampler(tiny_model, BackendSettings(backend="vllm"), verbose=False)


def generate_cfg(tiny_model: Path, out: Path, prompts: Path, **kw):
    from align.stages.generate import Config

    cfg = load_config(Config, ROOT / "stages/tiny/generate.yaml",
                      [f"model={tiny_model}", f"output_dir={out}", f"prompts={prompts}"])
    return dataclasses.replace(cfg, **kw)


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    questions = ["How do I store basil?", "Boil an egg?", "What goes with leeks?", "Can I freeze milk?",
                 "How ripe should a banana be for bread, and why does it matter so much?"]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "meta": {"n": i}} for i, q in enumerate(questions)])


def test_generate_stage_writes_k_samples_and_resumes(tiny_model: Path, prompt_file: Path, tmp_path: Path) -> None:
    from align.runs import read_manifest
    from align.stages.generate import run

    full = run(generate_cfg(tiny_model, tmp_path / "full", prompt_file))
    rows = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(len(r["responses"]) == 2 == len(r["finished"]) for r in rows)
    assert rows[4]["prompt"] == [{"role": "user", "content": prompt_file.read_text().splitlines()[4].split('"')[3]}]
    assert rows[0]["generation"]["temperature"] == 0.8 and rows[0]["generation"]["max_new_tokens"] == 8
    assert rows[0]["generation"]["backend"] == "hf" and rows[0]["meta"]["n"] == 0
    assert read_manifest(full)["metrics"]["samples"] == 10

    # A run killed after its first chunk (2 prompts) while writing the third row: a torn last line.
    part = tmp_path / "part"
    part.mkdir()
    lines = (full / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "samples.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    (part / "config.yaml").write_text((full / "config.yaml").read_text())
    (part / "manifest.json").write_text(json.dumps({**read_manifest(full), "status": "running"}))
    resumed = run(generate_cfg(tiny_model, part, prompt_file, resume=True))
    assert read_manifest(resumed)["metrics"]["sampled_this_run"] == 3
    # Chunks are seeded by position, so the resumed file is what the uninterrupted run wrote.
    assert (resumed / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()

    again = run(generate_cfg(tiny_model, part, prompt_file, resume=True))  # nothing left to do: no model load
    assert read_manifest(again)["metrics"]["sampled_this_run"] == 0


def test_generate_refuses_a_changed_prompt_file_and_a_full_folder(tiny_model: Path, prompt_file: Path,
                                                                  tmp_path: Path) -> None:
    from align.stages.generate import run

    out = tmp_path / "gen"
    run(generate_cfg(tiny_model, out, prompt_file, max_prompts=2))
    with pytest.raises(AlignError, match="overwrite=true"):
        run(generate_cfg(tiny_model, out, prompt_file, max_prompts=2))
    prompt_file.write_text(prompt_file.read_text().replace("basil", "thyme"))
    with pytest.raises(DataError, match="changed"):
        run(generate_cfg(tiny_model, out, prompt_file, max_prompts=2, resume=True))


def test_generate_recipes_load() -> None:
    from align.stages.generate import Config

    for recipe in ("stages/generate.yaml", "stages/tiny/generate.yaml"):
        cfg = load_config(Config, ROOT / recipe)
        assert cfg.k >= 2 and cfg.engine.backend in ("auto", "hf", "vllm")


# ---- vLLM (needs a CUDA GPU and `pip install -e '.[vllm]'`; `make test-gpu`) ----

@pytest.mark.gpu
def test_vllm_sampler_shapes_and_greedy_agreement_with_hf(tiny_model: Path) -> None:
    pytest.importorskip("vllm")
    vllm_sampler = build_sampler(tiny_model, BackendSettings(backend="vllm", dtype="float32",
                                                             gpu_memory_utilization=0.3), verbose=False)
    params = SamplingSettings(temperature=0.0, max_new_tokens=8)
    out = vllm_sampler.generate(PROMPTS, params, n=2)
    assert [len(s) for s in out] == [2, 2, 2]
    assert all(1 <= len(s.response_ids) <= 8 for samples in out for s in samples)
    hf = build_sampler(tiny_model, BackendSettings(backend="hf", dtype="float32"), verbose=False)
    hf_out = hf.generate(PROMPTS, params, n=1)
    agree = sum(v[0].response_ids[:4] == h[0].response_ids[:4] for v, h in zip(out, hf_out))
    assert agree >= 2  # random tiny weights leave near-ties; most greedy prefixes must still match


@pytest.mark.gpu
def test_vllm_serves_a_lora_adapter_as_a_lora_request(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model

    from align.models.load import load_model

    model = get_peft_model(load_model(tiny_model, dtype="float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tiny_model)
    cfg_path.write_text(json.dumps(cfg))
    sampler = build_sampler(tmp_path / "adapter", BackendSettings(backend="vllm", dtype="float32",
                                                                  gpu_memory_utilization=0.3), verbose=False)
    assert sampler.lora_request is not None
    out = sampler.generate(PROMPTS[:2], SamplingSettings(temperature=0.0, max_new_tokens=6), n=1)
    assert [len(s) for s in out] == [1, 1]


@pytest.mark.gpu
def test_vllm_adapter_swap_weight_reload_and_logprobs(tiny_model: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """The rollout hooks PPO uses, on the real engine (their contract is tested on CPU in test_vllm_fake.py)."""
    pytest.importorskip("vllm")
    from conftest import make_tiny_model
    from test_vllm_fake import save_adapter

    from align.generation.select import vllm_sampler
    from align.models.load import load_tokenizer

    engine = BackendSettings(backend="vllm", dtype="float32", gpu_memory_utilization=0.3)
    sampler = vllm_sampler(tiny_model, load_tokenizer(tiny_model), engine, lora_rank=8, logprobs=True)
    params = SamplingSettings(temperature=1.0, max_new_tokens=6)
    for step in range(2):
        sampler.set_adapter(save_adapter(tiny_model, tmp_path / "policy", seed=step))
        out = sampler.generate(PROMPTS[:2], params, n=2)
        assert all(len(s.logprobs) == len(s.response_ids) and max(s.logprobs) <= 0 for g in out for s in g)
    sampler.load_weights(make_tiny_model(tmp_path / "full", tokenizer_dir, seed=1))
    assert [len(g) for g in sampler.generate(PROMPTS[:2], params, n=2)] == [2, 2]


def both_paths(sampler, monkeypatch, prompts, params, n=1, seeds=None):
    """The same call through `decode` (finished rows leave the batch) and through `generate` (they stay)."""
    from align.generation import hf

    dropped = sampler.generate(prompts, params, n=n, seeds=seeds)
    monkeypatch.setattr(hf, "can_drop_rows", lambda model: False)
    kept = sampler.generate(prompts, params, n=n, seeds=seeds)
    monkeypatch.undo()
    return dropped, kept


@pytest.fixture(scope="module")
def lively(tiny_model: Path):
    """The tiny model's shape with larger random weights (initializer_range 0.2), whose answers depend on the
    prompt (with the default init its greedy answer repeats one token), and an EOS chosen by `end_with`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from align.generation.hf import HFSampler

    config = AutoConfig.from_pretrained(tiny_model)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return HFSampler(AutoModelForCausalLM.from_config(config).eval(), AutoTokenizer.from_pretrained(tiny_model),
                     logprobs=True)


def end_with(sampler, params, seeds=None) -> None:
    """Make the 3rd token of prompt 0's answer the sampler's EOS, so that row ends early and others do not."""
    sampler.eos_ids = {-1}  # never: the whole answer
    first = sampler.generate(PROMPTS[:1], params, seeds=seeds)[0][0].response_ids
    sampler.eos_ids = {first[2]}


def test_decode_drops_finished_rows_and_keeps_greedy_tokens(lively, monkeypatch) -> None:
    params = SamplingSettings(temperature=0.0, max_new_tokens=12, batch_size=8)
    end_with(lively, params)
    widths: list[int] = []  # rows per forward
    hook = lively.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        dropped, kept = both_paths(lively, monkeypatch, PROMPTS, params, n=2)
    finally:
        hook.remove()
    for a_group, b_group in zip(dropped, kept):
        for a, b in zip(a_group, b_group):
            assert a.response_ids == b.response_ids and a.finished == b.finished and a.text == b.text
    assert dropped[0][0].finished and len(dropped[0][0].response_ids) <= 3
    assert any(not s.finished for group in dropped for s in group)  # other rows ran to the limit
    assert widths[-12:] == [6] * 12  # generate: every row in each of its 12 forwards
    decoded = widths[:-12]
    assert decoded[:2] == [6, 6] and decoded[-1] == 4  # prompt 0's two rows left the batch when they ended
    assert len(decoded) == 12  # prefill + 11 steps (the 12th token needs no forward)


def test_decode_samples_the_same_tokens_and_logprobs_per_row_seed(lively, monkeypatch) -> None:
    params = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=12, batch_size=8)
    end_with(lively, params, seeds=[5])
    dropped, kept = both_paths(lively, monkeypatch, PROMPTS, params, n=3, seeds=[5, 6, 7])
    for a_group, b_group in zip(dropped, kept):
        for a, b in zip(a_group, b_group):
            assert a.response_ids == b.response_ids and a.finished == b.finished
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert dropped[0][0].finished and any(not s.finished for group in dropped for s in group)


def test_prompt_learning_models_decode_through_generate(tiny_model: Path) -> None:
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.generation.hf import can_drop_rows

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert can_drop_rows(base)
    assert can_drop_rows(get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not can_drop_rows(get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)))
