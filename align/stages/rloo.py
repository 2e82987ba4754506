"""RLOO: TRL's RLOOTrainer on prompt-only data, rewarded by the trained reward model or any score function.

REINFORCE Leave-One-Out: each of the `num_generations` completions of a prompt is baselined by the mean reward
of the OTHER completions of that prompt, an unbiased, critic-free baseline. Same setup as `align grpo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.config import DTYPE_HELP, Dtype, opt
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.stages.grpo import DataSettings, OnlineSettings
from align.training import TrainSettings, check_online_config


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/rloo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    data: DataSettings = opt(DataSettings(), "prompts")
    reward: RewardSettings = opt(RewardSettings(), "reward model or module:function")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method (lora | qlora | dora)")
    train: TrainSettings = opt(TrainSettings(lr=1e-5, batch_size=8, max_steps=20), "optimisation")
    online: OnlineSettings = opt(OnlineSettings(beta=0.05), "sampling and the policy-gradient loss")
    normalize_advantages: bool = opt(False, "standardise advantages over each generated batch")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs
        check_online_config("rloo", self.peft.method, self.train, self.online.num_generations)


def run(cfg: Config) -> Path:
    from trl import RLOOConfig, RLOOTrainer

    from align.training import run_trl_online

    return run_trl_online("rloo", cfg, RLOOTrainer, RLOOConfig, {"normalize_advantages": cfg.normalize_advantages})
