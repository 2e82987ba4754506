"""Every vLLM code path, on CPU, against tests/fake_vllm: a stand-in for the vllm package that mirrors the API
align uses (vLLM 0.10-0.33; see tests/fake_vllm/vllm/__init__.py for the sources) and checks its arguments the
way vLLM does. The real engine runs in test_generate.py's `gpu` tests."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from align.errors import ConfigError, DataError, ModelError
from align.generation import SamplingSettings
from align.generation.select import BackendSettings, build_sampler, vllm_sampler

FAKE = Path(__file__).resolve().parent / "fake_vllm"
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Salt or sugar for tomatoes?"}]]
ENGINE = BackendSettings(backend="vllm", dtype="float32")


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch):
    """The fake `vllm` importable for one test (it is never on sys.path otherwise)."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("a real vllm is installed: use make test-gpu")
    monkeypatch.syspath_prepend(str(FAKE))
    yield importlib.import_module("vllm")
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


def save_adapter(tiny_model: Path, out: Path, *, r: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter on the tiny model, saved the way the stages save one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.models.load import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(tiny_model, dtype="float32"),
                           LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# ---- the fake refuses what vLLM refuses ----

def test_fake_checks_arguments_like_vllm(vllm, tiny_model: Path) -> None:
    from vllm.lora.request import LoRARequest

    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):
        vllm.SamplingParams(max_new_tokens=8)
    with pytest.raises(TypeError, match="best_of"):  # 0.10-only: not valid across the range
        vllm.SamplingParams(best_of=2)
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        vllm.SamplingParams(n=2, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\]"):
        vllm.SamplingParams(temperature=2.5)
    with pytest.raises(TypeError, match="max_tokens must be int"):
        vllm.SamplingParams(max_tokens=8.0)
    assert vllm.SamplingParams(temperature=0.001).temperature == 0.01  # raised to _MAX_TEMP, as vLLM does
    with pytest.raises(ValueError, match="id must be > 0"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_tokens'"):
        vllm.LLM(model=str(tiny_model), max_num_tokens=8)
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vllm.LLM(model=str(tiny_model), max_model_len=4096)  # the tiny model's context is 512
    with pytest.raises(ValueError, match="divisible by tensor parallel size"):
        vllm.LLM(model=str(tiny_model), tensor_parallel_size=3)  # 4 attention heads
    llm = vllm.LLM(model=str(tiny_model))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate([{"prompt_token_ids": [1, 2]}], vllm.SamplingParams(), lora_request=LoRARequest("a", 1, "/x"))
    with pytest.raises(ValueError, match="lengths of prompts and sampling_params"):
        llm.generate([{"prompt_token_ids": [1]}] * 2, [vllm.SamplingParams()] * 3)


# ---- VLLMSampler ----

def test_sampler_generates_and_maps_engine_settings(vllm, tiny_model: Path) -> None:
    from align.generation.hf import chat_prompt_ids

    settings = BackendSettings(backend="vllm", dtype="bf16", tensor_parallel_size=2, gpu_memory_utilization=0.5)
    sampler = build_sampler(tiny_model, settings, verbose=False)
    assert sampler.name == "vllm" and sampler.lora_request is None
    args = sampler.llm.engine_args
    assert (args["model"], args["tokenizer"]) == (str(tiny_model), str(tiny_model))
    assert args["tensor_parallel_size"] == 2 and args["dtype"] == "bfloat16"
    assert args["gpu_memory_utilization"] == 0.5 and args["enable_lora"] is False
    assert args["max_model_len"] == 512  # 2048 asked, capped to the model's max_position_embeddings

    out = sampler.generate(PROMPTS, SamplingSettings(temperature=0.8, top_p=0.9, max_new_tokens=6, seed=3), n=3)
    assert [len(s) for s in out] == [3, 3]
    eos = sampler.tokenizer.eos_token_id
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            assert s.prompt_ids == chat_prompt_ids(sampler.tokenizer, prompt)
            assert 1 <= len(s.response_ids) <= 6 and s.logprobs is None
            assert s.finished == (s.response_ids[-1] == eos)
            assert s.text == sampler.tokenizer.decode(s.response_ids, skip_special_tokens=True).strip()
    (_, sp, lora), _ = sampler.llm.requests
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.seed) == (3, 0.8, 0.9, 6, 3)
    assert sp.skip_special_tokens is True and sp.logprobs is None and lora is None
    assert len({tuple(s.response_ids) for s in out[0]}) > 1  # sampled: the 3 differ


def test_greedy_with_n_asks_vllm_once_and_copies(vllm, tiny_model: Path) -> None:
    sampler = build_sampler(tiny_model, ENGINE, verbose=False)
    out = sampler.generate(PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=8), n=2)
    first, second = out[0]
    assert first.response_ids == second.response_ids
    assert first is not second
    assert [(sp.n, sp.temperature, sp.top_p) for _, sp, _ in sampler.llm.requests] == [(1, 0.0, 1.0)] * 2


def test_sampler_refuses_what_vllm_would(vllm, tiny_model: Path) -> None:
    sampler = build_sampler(tiny_model, ENGINE, verbose=False)
    with pytest.raises(ConfigError, match=r"temperature in \[0, 2\]"):
        sampler.generate(PROMPTS, SamplingSettings(temperature=3.0), n=1)
    long_prompt = [[{"role": "user", "content": "salt " * 600}]]
    with pytest.raises(DataError, match="max_model_len=512"):
        sampler.generate(long_prompt, SamplingSettings(), n=1)
    with pytest.raises(ConfigError, match="dtype"):
        build_sampler(tiny_model, BackendSettings(backend="vllm", dtype="int8"), verbose=False)


def test_sampler_returns_the_sampled_tokens_logprobs(vllm, tiny_model: Path) -> None:
    from align.models.load import load_tokenizer

    sampler = vllm_sampler(tiny_model, load_tokenizer(tiny_model), ENGINE, logprobs=True)
    assert sampler.llm.engine_args["logprobs_mode"] == "processed_logprobs"  # after temperature, as PPO scores
    out = sampler.generate(PROMPTS[:1], SamplingSettings(temperature=1.0, max_new_tokens=5), n=2)
    (_, sp, _), = sampler.llm.requests
    assert sp.logprobs == 0
    for s in out[0]:
        assert len(s.logprobs) == len(s.response_ids)
        assert all(-1.75 <= lp <= -0.25 for lp in s.logprobs)  # the fake's sampled-token values, not top-k's


def test_lora_adapter_is_sent_as_a_lora_request(vllm, tiny_model: Path, tmp_path: Path) -> None:
    adapter = save_adapter(tiny_model, tmp_path / "adapter", r=12)
    sampler = build_sampler(adapter, ENGINE, verbose=False)
    args = sampler.llm.engine_args
    assert args["model"] == str(tiny_model)
    assert (args["enable_lora"], args["max_lora_rank"], args["max_loras"]) == (True, 16, 1)  # r=12 -> 16
    lora = sampler.lora_request
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("adapter-1", 1, str(adapter.resolve()))
    plain = build_sampler(tiny_model, ENGINE, verbose=False)
    params = SamplingSettings(temperature=0.0, max_new_tokens=12)
    with_adapter = sampler.generate(PROMPTS, params)
    assert all(lr is lora for _, _, lr in sampler.llm.requests)
    assert [s[0].response_ids for s in with_adapter] != [s[0].response_ids for s in plain.generate(PROMPTS, params)]


def test_set_adapter_registers_each_update_as_a_new_request(vllm, tiny_model: Path, tmp_path: Path) -> None:
    """PPO/online rollouts: save the updated adapter (even into the same folder), then set_adapter."""
    from align.models.load import load_tokenizer

    sampler = vllm_sampler(tiny_model, load_tokenizer(tiny_model), ENGINE, lora_rank=8)
    assert sampler.lora_request is None and sampler.llm.engine_args["max_lora_rank"] == 8
    folder = tmp_path / "policy"
    params = SamplingSettings(temperature=1.0, max_new_tokens=6)
    sent = []
    for step in range(3):
        save_adapter(tiny_model, folder, seed=step)  # overwritten in place each step
        sent.append(sampler.set_adapter(folder))
        sampler.generate(PROMPTS[:1], params)
    assert [(r.lora_name, r.lora_int_id) for r in sent] == [("adapter-1", 1), ("adapter-2", 2), ("adapter-3", 3)]
    assert [lr.lora_int_id for _, _, lr in sampler.llm.requests] == [1, 2, 3]
    assert len(set(sent)) == 3  # LoRARequest equality is by name: the names must differ too

    # What set_adapter prevents: re-sending a known id with another adapter (vLLM would serve the cached one).
    from vllm.lora.request import LoRARequest

    other = save_adapter(tiny_model, tmp_path / "other")
    sampler.lora_request = LoRARequest("adapter-3", 3, str(other))
    with pytest.raises(AssertionError, match="would keep serving"):
        sampler.generate(PROMPTS[:1], params)

    with pytest.raises(ModelError, match="max_lora_rank 8"):
        sampler.set_adapter(save_adapter(tiny_model, tmp_path / "big", r=16))
    no_lora = build_sampler(tiny_model, ENGINE, verbose=False)
    with pytest.raises(ModelError, match="lora_rank="):
        no_lora.set_adapter(folder)


def test_adapter_with_extra_modules_is_refused_like_vllm(vllm, tiny_model: Path, tmp_path: Path) -> None:
    """vLLM loads only LoRA tensors of known modules: a PPO value head must not go into the rollout adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    from align.models.load import load_tokenizer

    adapter = save_adapter(tiny_model, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.value_head.weight": torch.zeros(1, 64)},
              adapter / "adapter_model.safetensors")
    sampler = vllm_sampler(tiny_model, load_tokenizer(tiny_model), ENGINE, lora_rank=8)
    sampler.set_adapter(adapter)
    with pytest.raises(ValueError, match=r"received \['base_model.model.value_head'\]"):
        sampler.generate(PROMPTS[:1], SamplingSettings(max_new_tokens=4))


def test_load_weights_reloads_the_engine_in_place(vllm, tiny_model: Path, tokenizer_dir: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning: the updated policy, saved with save_pretrained, replaces the engine's weights."""
    from conftest import make_tiny_model

    sampler = build_sampler(tiny_model, ENGINE, verbose=False)
    params = SamplingSettings(temperature=0.0, max_new_tokens=12)
    before = sampler.generate(PROMPTS, params)
    updated = make_tiny_model(tmp_path / "step1", tokenizer_dir, seed=1)
    sampler.load_weights(updated)
    assert sampler.llm.rpc_calls == [("reload_weights", (), {"weights_path": str(updated.resolve())})]
    after = sampler.generate(PROMPTS, params)  # the fake asserts the prefix cache was reset first
    assert [s[0].response_ids for s in after] != [s[0].response_ids for s in before]

    with pytest.raises(ModelError, match="no \\*.safetensors"):
        sampler.load_weights(tmp_path)
    monkeypatch.setattr(vllm, "__version__", "0.15.1")
    with pytest.raises(ModelError, match="vllm>=0.16"):
        sampler.load_weights(updated)


def test_auto_backend_picks_vllm_when_importable_with_cuda(vllm, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from align.generation.select import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "vllm"


# ---- stages on the vllm backend ----

def test_align_generate_on_the_vllm_backend(vllm, tiny_model: Path, tmp_path: Path) -> None:
    from conftest import write_jsonl

    from align.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in ("Basil?", "Eggs?", "Leeks?")])
    out = tmp_path / "gen"
    code = main(["generate", str(ROOT / "stages/tiny/generate.yaml"), f"model={tiny_model}", f"prompts={prompts}",
                 f"output_dir={out}", "engine.backend=vllm", "engine.tensor_parallel_size=2", "chunk=0"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["generation"]["backend"] == "vllm" and len(r["responses"]) == 2 for r in rows)
    assert all(1 <= n <= 8 for r in rows for n in r["response_tokens"])


def test_llm_judge_on_the_vllm_backend(vllm, tiny_model: Path) -> None:
    from align.judges import Verdict
    from align.judges.llm import Config, LLMJudge

    judge = LLMJudge(Config(model=str(tiny_model), max_new_tokens=4, engine=ENGINE))
    assert judge.sampler.name == "vllm"
    prompts = [[{"role": "user", "content": "Soup?"}], [{"role": "user", "content": "Bread?"}]]
    verdicts = judge.judge(prompts, [("Add salt.", "Add sugar."), ("Knead it.", "Bake it.")])
    assert len(verdicts) == 2 and all(isinstance(v, Verdict) for v in verdicts)
    requests = judge.sampler.llm.requests
    assert len(requests) == 4  # both orders of both pairs
    assert all((sp.n, sp.temperature, sp.max_tokens) == (1, 0.0, 4) for _, sp, _ in requests)
    decoded = [judge.sampler.tokenizer.decode(ids) for ids, _, _ in requests]
    assert "Add salt." in decoded[0] and "Add sugar." in decoded[0]


def test_llm_judge_logprob_verdicts_on_the_vllm_backend(vllm, tiny_model: Path) -> None:
    """verdict=logprob reads P("A") vs P("B") from vLLM's top next-token log-probabilities."""
    from align.judges.llm import VLLM_TOP, Config, LLMJudge

    judge = LLMJudge(Config(model=str(tiny_model), verdict="logprob", engine=ENGINE))
    prompts = [[{"role": "user", "content": f"Dish {i}?"}] for i in range(4)]
    verdicts = judge.judge(prompts, [("Roast it.", "Boil it.")] * 4)
    assert all(v.winner in ("a", "b") and 0.5 <= v.confidence <= 1 and not v.failed for v in verdicts)
    requests = judge.sampler.llm.requests
    assert len(requests) == 8 and all((sp.max_tokens, sp.temperature, sp.logprobs) == (1, 0.0, VLLM_TOP)
                                      for _, sp, _ in requests)
    prefix = judge.sampler.tokenizer.encode("Verdict:", add_special_tokens=False)
    assert all(ids[-len(prefix):] == prefix for ids, _, _ in requests)


# ---- stacked adapters, served dtype, memory ----

def adapter_chain(tiny_model: Path, root: Path) -> list[Path]:
    """SFT adapter on the tiny model -> DPO adapter on the SFT one -> online adapter on the DPO one, each saved with
    its tokenizer and naming the one below as its base, as the stages save them."""
    from align.models.load import load_tokenizer

    chain, base = [], tiny_model
    for seed, name in enumerate(("sft", "dpo", "online"), start=1):
        adapter = save_adapter(tiny_model, root / name, seed=seed)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
        load_tokenizer(tiny_model).save_pretrained(adapter)
        chain.append(adapter)
        base = adapter
    return chain


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_stacked_adapter_is_served_on_its_merged_base(vllm, tiny_model: Path, tmp_path: Path, cache: Path) -> None:
    """online adapter on a DPO adapter on an SFT adapter: vLLM's base must be a model folder, so the SFT + DPO
    adapters are merged into one (saved in the served dtype) and the online adapter goes as a LoRA request."""
    import torch
    from safetensors.torch import load_file

    from align.models.load import load_model

    _, dpo, online = adapter_chain(tiny_model, tmp_path)
    sampler = build_sampler(online, BackendSettings(backend="vllm"), verbose=False)
    base = Path(sampler.llm.engine_args["model"])
    assert base.parent == cache / "merged" and (base / "config.json").is_file()  # a plain folder, not dpo/
    assert sampler.lora_request.lora_path == str(online.resolve())
    assert sampler.llm.engine_args["dtype"] == "bfloat16" == sampler.llm.served_dtype  # stated, never "auto"
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    # the merged base is exactly the SFT + DPO model (merged in float32), rounded once to bf16
    expected = load_model(dpo, dtype="float32").to(torch.bfloat16).state_dict()
    saved = load_file(str(base / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                           load_model(tiny_model, dtype="float32").to(torch.bfloat16).state_dict()[
                               "model.layers.0.self_attn.q_proj.weight"])  # the adapters are in it
    assert sampler.generate(PROMPTS, SamplingSettings(max_new_tokens=4))[0][0].response_ids
    # the same chain again: the merge is reused, not redone
    again = build_sampler(online, BackendSettings(backend="vllm"), verbose=False)
    assert Path(again.llm.engine_args["model"]) == base and len(list((cache / "merged").iterdir())) == 1


def test_the_fake_refuses_an_adapter_folder_as_the_base(vllm, tiny_model: Path, tmp_path: Path) -> None:
    """What generate/online did before: base_of_adapter(online adapter) is the DPO adapter folder."""
    _, dpo, _ = adapter_chain(tiny_model, tmp_path)
    with pytest.raises(OSError, match="config.json"):
        vllm.LLM(model=str(dpo))


def test_a_dora_adapter_is_merged_whole(vllm, tiny_model: Path, tmp_path: Path, cache: Path) -> None:
    online = adapter_chain(tiny_model, tmp_path)[-1]
    config = json.loads((online / "adapter_config.json").read_text())
    (online / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    sampler = build_sampler(online, BackendSettings(backend="vllm", dtype="float16"), verbose=False)
    assert sampler.lora_request is None and sampler.llm.engine_args["enable_lora"] is False
    assert sampler.llm.served_dtype == "float16"


def test_a_float32_folder_is_served_in_the_dtype_asked(vllm, tiny_model: Path) -> None:
    """vLLM's own auto would serve the float32 tiny model in float16; align always states the dtype."""
    assert json.loads((tiny_model / "config.json").read_text()).get("dtype", "float32") == "float32"
    assert vllm.LLM(model=str(tiny_model)).served_dtype == "float16"  # the pitfall, mirrored
    sampler = build_sampler(tiny_model, BackendSettings(backend="vllm"), verbose=False)
    assert sampler.llm.engine_args["dtype"] == sampler.llm.served_dtype == "bfloat16"


def test_sleep_mode_frees_the_engine_between_rollouts_and_close_shuts_it_down(vllm, tiny_model: Path) -> None:
    from vllm import distributed

    from align.generation.vllm import close_engines
    from align.models.load import load_tokenizer

    plain = vllm_sampler(tiny_model, load_tokenizer(tiny_model), ENGINE)
    with pytest.raises(AssertionError, match="Sleep mode is not enabled"):
        plain.llm.sleep()
    plain.sleep()  # without sleep mode: a no-op, not vLLM's assertion
    settings = BackendSettings(backend="vllm", dtype="float32", sleep=True, gpu_memory_utilization=0.3)
    sampler = vllm_sampler(tiny_model, load_tokenizer(tiny_model), settings)
    assert sampler.llm.engine_args["enable_sleep_mode"] is True
    sampler.sleep()
    assert sampler.llm.sleeping
    assert sampler.generate(PROMPTS[:1], SamplingSettings(max_new_tokens=3))  # woken first (the fake asserts)
    assert not sampler.llm.sleeping
    calls = distributed.calls
    closed = close_engines()
    assert [(e["gpu_memory_utilization"], e["sleep_mode"]) for e in closed[-2:]] == [(0.85, False), (0.3, True)]
    assert sampler.llm is None and plain.llm is None and distributed.calls == calls + 2
    assert close_engines() == []


def test_generate_and_ppo_run_on_a_stacked_adapter(vllm, tiny_model: Path, tmp_path: Path, cache: Path,
                                                   one_thread: None) -> None:
    from conftest import write_jsonl

    from align.cli import main
    from align.config import load_config
    from align.stages import ppo

    _, _, online = adapter_chain(tiny_model, tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in ("Basil?", "Eggs?")])
    assert main(["generate", str(ROOT / "stages/tiny/generate.yaml"), f"model={online}", f"prompts={prompts}",
                 f"output_dir={tmp_path / 'gen'}", "engine.backend=vllm", "chunk=0"]) == 0
    assert (tmp_path / "gen" / "samples.jsonl").read_text().count("\n") == 2

    out = ppo.run(load_config(ppo.Config, ROOT / "stages/tiny/ppo.yaml", [
        f"policy={online}", f"output_dir={tmp_path / 'ppo'}", "reward.function=conftest:count_e",
        "engine.backend=vllm", "engine.sleep=true", "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=4",
        "data.eval_size=0", "sampling.max_new_tokens=4"]))
    engine = json.loads((out / "manifest.json").read_text())["engine"]
    base = Path(engine["model"])
    assert base.parent == cache / "merged" and base.name.startswith("online-bfloat16-")  # the whole chain merged
    assert (engine["dtype"], engine["gpu_memory_utilization"], engine["sleep_mode"]) == ("bfloat16", 0.3, True)


def test_online_rounds_sample_a_stacked_adapter_and_close_each_engine(vllm, tiny_model: Path, tmp_path: Path,
                                                                     cache: Path, one_thread: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2 samples from round 1's DPO adapter, itself trained on the SFT adapter: a chain vLLM can only serve on
    a merged base. Every generate substage's engine is shut down before the judge and DPO substages run."""
    import align.generation.vllm as backend
    from align.config import load_config
    from align.stages import online

    monkeypatch.setattr(backend, "vllm_available", lambda: True)  # engine.backend=auto picks vLLM, as on a GPU
    sft = adapter_chain(tiny_model, tmp_path)[0]
    backend.close_engines()
    open_at_start: list[int] = []  # engines alive when each substage starts
    original = online.substage
    monkeypatch.setattr(online, "substage", lambda *a: (open_at_start.append(len(backend._OPEN)), original(*a))[1])
    out = online.run(load_config(online.Config, ROOT / "stages/tiny/online.yaml", [
        f"policy={sft}", f"output_dir={tmp_path / 'run'}", "rounds=2", "prompts_per_round=4", "k=2",
        "train.max_steps=2"]))
    engines = json.loads((out / "manifest.json").read_text())["engines"]
    assert [(e["round"], e["stage"]) for e in engines] == [(1, "generate"), (2, "generate")]
    assert Path(engines[0]["model"]) == tiny_model  # round 1: the SFT adapter as a LoRA request on its base
    assert Path(engines[1]["model"]).parent == cache / "merged"  # round 2: SFT merged, round 1's DPO as LoRA
    assert open_at_start == [0] * 8 and len(backend._OPEN) == 0
