"""GRPO: TRL's GRPOTrainer on prompt-only data, rewarded by the trained reward model or any score function.

Per prompt, `num_generations` completions are sampled; each one's advantage is its reward minus the group's mean
(divided by the group's std with scale_rewards=group), so no critic is needed. `beta` > 0 adds a KL penalty to
the reference (the adapter-disabled policy). `run_online` is shared with `align rloo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import opt
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.training import TrainSettings


@dataclass(frozen=True)
class OnlineSettings:
    num_generations: int = opt(4, "completions per prompt (the group); the batch size must be a multiple")
    max_completion_length: int = opt(48, "longest completion in tokens")
    temperature: float = opt(1.0, "sampling temperature")
    beta: float = opt(0.04, "KL coefficient to the reference (adapter disabled); 0 skips the reference pass")
    epsilon: float = opt(0.2, "ratio clip ε")
    num_iterations: int = opt(1, "optimisation passes per generated batch (μ)")
    mask_truncated_completions: bool = opt(False, "leave completions cut at max_completion_length out of the loss")


@dataclass(frozen=True)
class DataSettings:
    prompts: str = opt("data/prompts/train.jsonl", "prompt-only JSONL ({\"prompt\": [messages]} per line)")


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/grpo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed")
    dtype: str = opt("auto", "auto (bf16 where fast) | float32 | bfloat16 | float16")
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    data: DataSettings = opt(DataSettings(), "prompts")
    reward: RewardSettings = opt(RewardSettings(), "reward model or module:function")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method (lora | qlora | dora)")
    train: TrainSettings = opt(TrainSettings(lr=1e-5, batch_size=8, max_steps=20), "optimisation")
    online: OnlineSettings = opt(OnlineSettings(), "sampling and the policy-gradient loss")
    scale_rewards: str = opt("group", "group (÷ group std) | batch | none (Dr. GRPO)")


def prompt_dataset(path: str) -> Any:
    from datasets import Dataset

    from align.data.records import read_prompts

    return Dataset.from_list([{"prompt": r.prompt} for r in read_prompts(path)])


def run_online(stage: str, cfg: Any, trainer_cls: Any, config_cls: Any, algo: dict[str, Any]) -> Path:
    """Shared by GRPO and RLOO: load the policy + adapter, wrap the reward, train, save the adapter."""
    import torch

    from align.errors import ConfigError
    from align.models.load import load_model, load_tokenizer, pick_dtype, resolve_model
    from align.models.peft import attach_peft, count_parameters
    from align.rewards import load_reward, trl_reward_func
    from align.rlhf.policy import point_adapter_at
    from align.runs import start_run
    from align.training import callbacks, history_metrics, last_checkpoint, precision_flags, trainer_kwargs

    o = cfg.online
    if cfg.peft.method not in ("lora", "qlora", "dora"):
        # The reference is the adapter-disabled policy; with full fine-tuning TRL would reload the base model
        # by name as the reference, which is not the SFT policy when that was an adapter.
        raise ConfigError(f"peft.method={cfg.peft.method} is not supported by {stage}; use lora, qlora or dora")
    if cfg.train.batch_size * cfg.train.grad_accum % o.num_generations:
        raise ConfigError(f"train.batch_size × train.grad_accum must be a multiple of online.num_generations="
                          f"{o.num_generations}")
    dataset = prompt_dataset(cfg.data.prompts)
    reward_fn, reward_from = load_reward(cfg.reward)
    run_ = start_run(stage, cfg, resume=cfg.resume)
    torch.manual_seed(cfg.seed)
    source = resolve_model(cfg.policy)
    run_.add_input(cfg.data.prompts)
    run_.add_input(source)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    dtype = pick_dtype(cfg.dtype)
    model = load_model(source, dtype=cfg.dtype, load_in_4bit=cfg.peft.method == "qlora", merge=True,
                       trust_remote_code=cfg.trust_remote_code)
    model, trained = attach_peft(model, cfg.peft, total_steps=max(cfg.train.max_steps, 1))
    n_train, n_total = count_parameters(model)
    print(f"{stage}: {trained} ({n_train:,} of {n_total:,} parameters); reward: {reward_from}", flush=True)

    args = config_cls(**trainer_kwargs(cfg.train, run_.dir, seed=cfg.seed, has_eval=False), **precision_flags(dtype),
                      num_generations=o.num_generations, max_completion_length=o.max_completion_length,
                      temperature=o.temperature, beta=o.beta, epsilon=o.epsilon, num_iterations=o.num_iterations,
                      mask_truncated_completions=o.mask_truncated_completions, **algo)
    trainer = trainer_cls(model=model, reward_funcs=[trl_reward_func(reward_fn, "reward")], args=args,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks(cfg.train, run_.dir, False))
    trainer.train(resume_from_checkpoint=last_checkpoint(run_.dir) if cfg.resume else None)

    out = run_.dir / "model"
    # TRL may add a frozen "ref" copy of the fresh adapter as the reference; save only the trained one.
    trainer.model.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
    tokenizer.save_pretrained(out)
    point_adapter_at(out, source)
    run_.add_output("model", out)
    history = [h for h in trainer.state.log_history if "reward" in h]
    run_.metrics.update(history_metrics(trainer.state.log_history))
    if history:
        run_.metrics.update({"first/reward": history[0]["reward"], "last/reward": history[-1]["reward"]})
    run_.metrics.update({"trainable_params": n_train, "total_params": n_total})
    run_.extra["reward"] = reward_from
    return run_.finish()


def run(cfg: Config) -> Path:
    from trl import GRPOConfig, GRPOTrainer

    return run_online("grpo", cfg, GRPOTrainer, GRPOConfig, {"scale_rewards": cfg.scale_rewards})
