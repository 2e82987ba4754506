"""GRPO: TRL's GRPOTrainer on prompt-only data, rewarded by the trained reward model or any score function.

Per prompt, `num_generations` completions are sampled; each one's advantage is its reward minus the group's mean
(divided by the group's std with scale_rewards=group), so no critic is needed. `beta` > 0 adds a KL penalty to
the reference (the adapter-disabled policy). The loop itself is `align.training.run_trl_online`, shared with `align rloo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.config import DTYPE_HELP, Dtype, opt
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.training import TrainSettings, check_online_config


@dataclass(frozen=True)
class OnlineSettings:
    num_generations: int = opt(4, "completions per prompt (the group); the batch size must be a multiple", ge=2)
    max_completion_length: int = opt(48, "longest completion in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature", gt=0.0)
    beta: float = opt(0.04, "KL coefficient to the reference (adapter disabled); 0 skips the reference pass", ge=0.0)
    epsilon: float = opt(0.2, "ratio clip ε", gt=0.0)
    num_iterations: int = opt(1, "optimisation passes per generated batch (μ)", ge=1)
    mask_truncated_completions: bool = opt(False, "leave completions cut at max_completion_length out of the loss")
    use_vllm: bool = opt(False, "sample the groups with vLLM (TRL's colocated engine; a CUDA GPU with vllm "
                                "installed), which TRL hands the updated weights each step")


@dataclass(frozen=True)
class DataSettings:
    prompts: str = opt("data/prompts/train.jsonl", "prompt-only JSONL ({\"prompt\": [messages]} per line)")


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/grpo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    data: DataSettings = opt(DataSettings(), "prompts")
    reward: RewardSettings = opt(RewardSettings(), "reward model or module:function")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method (lora | qlora | dora)")
    train: TrainSettings = opt(TrainSettings(lr=1e-5, batch_size=8, max_steps=20), "optimisation")
    online: OnlineSettings = opt(OnlineSettings(), "sampling and the policy-gradient loss")
    scale_rewards: Literal["group", "batch", "none"] = opt("group", "group (÷ group std) | batch | none (Dr. GRPO)")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs
        check_online_config("grpo", self.peft.method, self.train, self.online.num_generations)


def run(cfg: Config) -> Path:
    from trl import GRPOConfig, GRPOTrainer

    from align.training import run_trl_online

    return run_trl_online("grpo", cfg, GRPOTrainer, GRPOConfig, {"scale_rewards": cfg.scale_rewards})
