"""GRPO and RLOO stages (TRL trainers) on a tiny model: a few steps, finite metrics, an adapter saved."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from align.config import load_config
from align.errors import ConfigError
from align.rewards import RewardSettings, load_reward, trl_reward_func

REPO = Path(__file__).resolve().parent.parent






@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_stage_smoke(stage: str, tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    module = importlib.import_module(f"align.stages.{stage}")
    cfg = load_config(module.Config, REPO / "stages" / "tiny" / f"{stage}.yaml",
                      [f"policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "reward.function=conftest:count_e",
                       "train.max_steps=2"])
    run_dir = module.run(cfg)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    for key in ("reward", "kl", "train_loss", "first/reward", "last/reward"):
        assert math.isfinite(metrics[key]), key
    model = run_dir / "model"
    assert (model / "adapter_model.safetensors").is_file() and not (model / "ref").exists()
    assert json.loads((model / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model.resolve())


def test_online_stage_rejects_bad_group_size(tiny_model: Path, tmp_path: Path) -> None:
    from align.stages import grpo

    with pytest.raises(ConfigError, match="num_generations"):  # refused when the config loads, before anything runs
        load_config(grpo.Config, REPO / "stages" / "tiny" / "grpo.yaml",
                    [f"policy={tiny_model}", f"output_dir={tmp_path}", "online.num_generations=3"])


def test_trl_reward_func_adapts_conversational_and_text_inputs() -> None:
    fn, where = load_reward(RewardSettings(function="conftest:count_e"))
    assert where == "function conftest:count_e"
    reward = trl_reward_func(fn, "house")
    prompts = [[{"role": "user", "content": "hi"}], "plain prompt"]
    completions = [[{"role": "assistant", "content": "eeee"}], "ee"]
    assert reward(prompts=prompts, completions=completions, extra_column=[1, 2]) == [0.4, 0.2]
    assert reward.__name__ == "house"


def test_reward_function_errors() -> None:
    for spec, match in (("no_colon", "must look like package.module:Name"), ("no_such_module_x:f", "cannot import"),
                        ("test_grpo:missing", "has no attribute")):
        with pytest.raises(ConfigError, match=match):
            load_reward(RewardSettings(function=spec))
    fn, _ = load_reward(RewardSettings(function="test_grpo:not_a_number"))
    with pytest.raises(ConfigError, match="must return a number"):
        fn([[{"role": "user", "content": "x"}]], ["y"])


def not_a_number(prompt: list, response: str) -> str:
    return "high"


def test_use_vllm_is_trls_colocated_engine_and_refused_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.training import vllm_kwargs

    assert vllm_kwargs(False) == {}
    monkeypatch.setattr("align.generation.vllm.vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="use_vllm=true needs the vllm package"):
        vllm_kwargs(True)
    monkeypatch.setattr("align.generation.vllm.vllm_available", lambda: True)
    assert vllm_kwargs(True) == {"use_vllm": True, "vllm_mode": "colocate"}
