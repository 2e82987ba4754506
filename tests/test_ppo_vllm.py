"""PPO rollouts through the vLLM Sampler (against tests/fake_vllm): the updated adapter is handed to the engine
as a new LoRA request every step, PPO's log-probs are recomputed by the trainer, and the mismatch is logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_vllm_fake import vllm  # noqa: F401 - the fixture that makes the fake importable

from align.config import load_config
from align.errors import ConfigError
from align.stages import ppo

TINY = Path(__file__).resolve().parent.parent / "stages" / "tiny" / "ppo.yaml"


def test_ppo_rollouts_come_from_vllm_with_a_fresh_adapter_each_step(vllm, tiny_model: Path,  # noqa: F811
                                                                    tmp_path: Path, one_thread: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    from align.generation.vllm import VLLMSampler

    original = VLLMSampler.set_adapter
    monkeypatch.setattr(VLLMSampler, "set_adapter",
                        lambda self, path: sent.append(str(path)) or original(self, path))
    out = ppo.run(load_config(ppo.Config, TINY, [
        f"policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "reward.function=conftest:count_e",
        "engine.backend=vllm", "ppo.steps=2", "ppo.batch_size=4", "ppo.mini_batch_size=4", "data.eval_size=0",
        "sampling.max_new_tokens=6"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and json.loads((out / "manifest.json").read_text())["status"] == "completed"
    # the sampler's log-probs are never used for the loss; their distance to the trainer's is logged
    assert all(math.isfinite(r["sampler/logprob_absdiff"]) and r["sampler/logprob_absdiff"] >= 0 for r in rows)
    # one adapter hand-over per step, each a new folder; only the newest is kept
    assert [Path(p).name for p in sent] == ["step-0", "step-1"]
    assert [p.name for p in (out / "rollout" / "rank-0").iterdir()] == ["step-1"]
    assert not (out / "rollout" / "rank-0" / "step-1" / "value_head.safetensors").exists()


def test_ppo_vllm_needs_lora_or_full() -> None:
    with pytest.raises(ConfigError, match="engine.backend=vllm serves plain LoRA"):
        load_config(ppo.Config, TINY, ["engine.backend=vllm", "peft.method=dora"])
