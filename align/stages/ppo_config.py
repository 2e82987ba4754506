"""PPO's recipe schema: the Config of `align ppo` and its groups (sampling, optimisation, KL, shaping, critic,
logging, rollout engine), with the cross-field rules checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.chat import SYSTEM_PROMPT_HELP
from align.config import DTYPE_HELP, Dtype, opt
from align.errors import ConfigError
from align.generation import SamplingSettings
from align.generation.select import COLOCATED, BackendSettings
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.rlhf.core import KLEstimator
from align.tracking import TRACKERS_HELP, TrackerName


@dataclass(frozen=True)
class DataSettings:
    prompts: str = opt("data/prompts/train.jsonl", "prompt-only JSONL to sample rollouts from")
    eval_prompts: str = opt("data/prompts/eval.jsonl", "held-out prompts for the before/after check")
    eval_size: int = opt(16, "held-out prompts to evaluate at the end (0: skip)", ge=0)


@dataclass(frozen=True)
class PPOSettings:
    steps: int = opt(16, "PPO steps (rollout batch + optimisation) in total", ge=1)
    batch_size: int = opt(8, "prompts sampled per step and process (one response each)", ge=1)
    mini_batch_size: int = opt(8, "rows per forward/backward pass", ge=1)
    grad_accum: int = opt(1, "mini-batches per optimizer step", ge=1)
    epochs: int = opt(2, "PPO epochs over each rollout batch", ge=1)
    lr: float = opt(1e-4, "AdamW learning rate (constant)", gt=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0.0)
    clip_range: float = opt(0.2, "policy ratio clip ε", gt=0.0)
    value_clip_range: float = opt(0.2, "value clip ε (in reward units)", gt=0.0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0.0)
    gamma: float = opt(1.0, "discount per token", ge=0.0, le=1.0)
    lam: float = opt(0.95, "GAE λ", ge=0.0, le=1.0)
    whiten_advantages: bool = opt(True, "normalise advantages over the batch (every process's tokens together)")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token's policy loss by min(π_old / "
                              "π_sampler, tis_cap), correcting for a sampler that is not exactly the trained policy "
                              "(a bf16 copy, vLLM); 0: off. sampler/logprob_* in metrics.jsonl show the gap; "
                              "2 is the usual choice (verl, TRL)", ge=0.0)


@dataclass(frozen=True)
class KLSettings:
    coef: float = opt(0.05, "initial β of the per-token KL penalty −β·KL(policy || reference)", ge=0.0)
    target: float = opt(0.0, "target KL per sequence for the adaptive controller (0: β stays fixed)", ge=0.0)
    horizon: int = opt(10000, "adaptive controller horizon in samples (larger: slower β changes)", ge=1)
    estimator: KLEstimator = opt("k1", "per-token KL estimator in the reward: k1 (lp−ref) | k2 | k3")
    reference_dtype: Dtype = opt("auto", "dtype of the reference log-prob pass: a frozen copy of the reference in "
                                 "it when it differs from dtype (auto on a CPU: bf16 where a no-grad forward "
                                 "measured faster, ~3x here; its log-probs differ from fp32 by ~0.05/token, so "
                                 "kl/ref starts near -0.004/token, not 0); float32 with dtype=float32: the exact "
                                 "adapter-disabled pass")


@dataclass(frozen=True)
class ShapingSettings:
    missing_eos_penalty: float = opt(1.0, "subtracted from the score of a response cut at max_new_tokens (0: off)", ge=0.0)
    normalize: bool = opt(False, "standardise scores with the running mean/std of every score so far")
    clip: float = opt(0.0, "clip (shaped) scores to [-clip, clip] (0: off)", ge=0.0)
    length_control: bool = opt(False, "subtract from each score its linear trend in response length, fitted over "
                                      "the step's rollouts, so a reward model's length bias is not learned")


@dataclass(frozen=True)
class CriticSettings:
    kind: Literal["value_head", "reward_model"] = opt("value_head", "value_head (linear head on the policy's "
                                                      "backbone) | reward_model (separate critic from the RM)")
    model: str = opt("", "reward_model critic: the reward-model run folder ('' = reward.model)")


@dataclass(frozen=True)
class LogSettings:
    sample_every: int = opt(5, "write sample responses (samples.jsonl, TensorBoard) every N steps", ge=1)
    save_every: int = opt(5, "write a resumable checkpoint every N steps (and at the end)", ge=1)
    keep_checkpoints: int = opt(2, "checkpoints to keep", ge=1)
    progress: bool = opt(True, "show a progress bar of the steps (on a terminal only: none in CI logs or files)")
    report_to: list[TrackerName] = opt([], TRACKERS_HELP)


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/ppo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("float32", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    collective_timeout: int = opt(600, "seconds a process waits for the others at a collective (gather, barrier) "
                                       "before it ends with an error: a process that died ends the rest", ge=10)
    reward: RewardSettings = opt(RewardSettings(), "where the reward comes from")
    data: DataSettings = opt(DataSettings(), "prompts")
    system_prompt: str = opt("", SYSTEM_PROMPT_HELP)
    sampling: SamplingSettings = opt(SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=48),
                                     "rollout sampling (top_p must be 1: PPO scores the distribution it samples)")
    peft: PeftSettings = opt(PeftSettings(dropout=0.0), "actor: lora | qlora | dora | full")
    ppo: PPOSettings = opt(PPOSettings(), "optimisation")
    kl: KLSettings = opt(KLSettings(), "KL penalty to the reference")
    shaping: ShapingSettings = opt(ShapingSettings(), "score shaping before it becomes the reward")
    critic: CriticSettings = opt(CriticSettings(), "value function")
    log: LogSettings = opt(LogSettings(), "logging and checkpoints")
    engine: BackendSettings = opt(COLOCATED, "rollout sampler: hf (the trained model itself, or a copy "
                                  "refreshed every step when engine.dtype differs from dtype: auto on a CPU = bf16 "
                                  "where measured faster; float32 samples the exact policy) | vllm (an engine "
                                  "handed the updated adapter or weights every step) | auto (vllm when installed "
                                  "with a GPU)")

    def __post_init__(self) -> None:
        """Cross-field rules, before anything loads."""
        from align.models.policy import check_method

        p = self.ppo
        check_method("ppo", self.peft.method)
        if p.batch_size % (p.mini_batch_size * p.grad_accum):
            raise ConfigError(f"ppo.batch_size={p.batch_size} must be a multiple of ppo.mini_batch_size × ppo.grad_accum"
                              f" = {p.mini_batch_size * p.grad_accum}")
        if self.engine.backend == "vllm" and self.peft.method not in ("lora", "full"):
            raise ConfigError(f"engine.backend=vllm serves plain LoRA adapters or full weights; peft.method="
                              f"{self.peft.method} needs engine.backend=hf")
        if self.sampling.temperature <= 0 or self.sampling.top_p < 1.0:
            raise ConfigError("PPO samples from the policy it optimises: set sampling.temperature > 0 and "
                              "sampling.top_p=1.0")
