"""Shared settings and plumbing for the stages that train with a (TRL) Trainer: SFT, reward, DPO, GRPO, RLOO."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from align.config import opt
from align.errors import ConfigError
from align.log import progress_enabled
from align.tracking import TRACKERS_HELP, TrackerName, check_trackers

log = logging.getLogger(__name__)


# Tokens per forward/backward pass, at most, when train.forward_batch is auto on a CPU. Activations kept for backward
# grow with the tokens of a pass; on 2 cores (default model, LoRA r16, fp32, 8 steps, one run each) a reward batch of
# 8 pairs at max_length 384 ran at 0.74 pairs/s in one pass and 1.05 in 8 passes of one pair, peak RSS 4.7 -> 1.8 GB;
# DPO 4 pairs 0.37 -> 0.45-0.51 pairs/s, 3.4 -> 1.9-2.5 GB; SFT 8 examples 114 -> 113-120 tokens/s, 3.9 -> 2.0-2.2 GB.
# The stages size passes by their data's longest example, not max_length: passes far under the budget pay per-pass
# overhead (2026-12-06, demo pairs of <= 253 tokens, max_length 384, fp32, 8 steps: DPO 4 pairs in passes of 2 vs 1
# 33.0 / 39.1 vs 40.9 / 47.5 s; reward 8 pairs in passes of 2 vs 1 49.2 / 52.6 vs 55.2 / 60.3 s).
FORWARD_TOKENS = 1024


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = opt(1.0, "passes over the training data", gt=0.0)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: use epochs)", ge=-1)
    lr: float = opt(2e-4, "peak learning rate (AdamW)", ge=0.0)
    batch_size: int = opt(8, "examples per device per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    forward_batch: int = opt(0, "examples per forward/backward pass (SFT, reward, DPO): each micro-batch runs as "
                                "batch_size / forward_batch passes with their gradients summed — the same update, "
                                "less activation memory; must divide batch_size. 0: auto (a CPU: passes of at most "
                                f"{FORWARD_TOKENS} tokens of the longest training example; a GPU, or a loss that is not a mean over "
                                "examples or tokens: the whole micro-batch)", ge=0)
    warmup_ratio: float = opt(0.05, "fraction of steps with linear warm-up", ge=0.0, lt=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                          "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"] = opt(
        "cosine", "learning-rate schedule (transformers SchedulerType)")
    eval_steps: int = opt(20, "evaluate on the validation split every N steps (0: only at the end)", ge=0)
    logging_steps: int = opt(5, "log training metrics every N steps", ge=1)
    save_steps: int = opt(50, "write a resumable checkpoint every N steps", ge=1)
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0: off)", ge=0)
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    progress: bool = opt(True, "show a progress bar")
    report_to: list[TrackerName] = opt([], TRACKERS_HELP)

    def __post_init__(self) -> None:
        check_trackers(list(self.report_to))  # a missing tracker package fails before anything runs
        if self.forward_batch and self.batch_size % self.forward_batch:
            raise ConfigError(f"train.forward_batch={self.forward_batch} must divide train.batch_size="
                              f"{self.batch_size} (every pass the same size: the summed gradients are the batch's)")


def forward_batch(t: TrainSettings, example_tokens: int | None) -> int:
    """Examples per forward/backward pass: train.forward_batch, else (auto) on a CPU the largest divisor of
    batch_size whose passes hold at most FORWARD_TOKENS tokens of `example_tokens` each (at least 1); on a GPU, or
    where the stage's loss would change under the split (`example_tokens` None), the whole micro-batch.
    `example_tokens`: what the longest training example holds in a pass, padded or packed (`longest_example`)."""
    if t.forward_batch:
        return t.forward_batch
    if example_tokens is None or torch.cuda.is_available():
        return t.batch_size
    fits = [d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0 and d * example_tokens <= FORWARD_TOKENS]
    return max(fits, default=1)


def longest_example(lengths: Iterable[int], per_example: int = 1) -> int:
    """Tokens the longest training example takes in a pass: its longest sequence times `per_example` (a preference
    pair is 2 sequences, each padded to the longer one or packed: at most twice the longest either way)."""
    return per_example * max(lengths, default=1)


def total_steps(examples: int, t: TrainSettings) -> int:
    """Optimizer steps a Trainer run will take: max_steps, else epochs over `examples` (per-process batch)."""
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(math.ceil(examples / (t.batch_size * t.grad_accum)) * t.epochs))


def precision_flags(dtype: torch.dtype) -> dict[str, bool]:
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def trainer_kwargs(t: TrainSettings, run_dir: Path, *, seed: int, has_eval: bool,
                   example_tokens: int | None = None) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, ...).
    `example_tokens`: the most tokens one example can hold, where the stage's loss is a mean over examples or tokens
    that summing the gradients of equal passes keeps (`forward_batch`); None: no split unless train.forward_batch."""
    passes = t.batch_size // forward_batch(t, example_tokens)
    eval_every = t.eval_steps if t.eval_steps > 0 else None
    strategy = ("steps" if eval_every else "epoch") if has_eval else "no"
    kwargs: dict[str, Any] = {
        "output_dir": str(Path(run_dir) / "checkpoints"),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "learning_rate": t.lr,
        "per_device_train_batch_size": t.batch_size // passes,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum * passes,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "lr_scheduler_type": t.lr_scheduler,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # a non-finite loss is logged as it is, so the run stops on it (run_callback)
        "eval_strategy": strategy,
        "eval_steps": eval_every,
        "save_strategy": strategy if (has_eval and t.early_stopping_patience) else "steps",
        "save_steps": eval_every if (has_eval and t.early_stopping_patience and eval_every) else t.save_steps,
        "save_total_limit": 2,
        "load_best_model_at_end": bool(has_eval and t.early_stopping_patience),
        "metric_for_best_model": "eval_loss" if has_eval else None,
        "greater_is_better": False,
        "report_to": "none",  # TensorBoard (in the run folder) and train.report_to are attached in callbacks()
        "disable_tqdm": not (t.progress and progress_enabled()),  # none in a log file, in CI, under --quiet
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "save_only_model": False,
    }
    # TRL turns checkpointing on by default; we choose explicitly (prefix tuning breaks under it).
    kwargs[checkpointing_field()] = t.gradient_checkpointing
    return kwargs


def checkpointing_field() -> str:
    """The TrainingArguments field that turns activation checkpointing on: `activation_checkpointing` in the
    transformers releases that renamed it (the old name is a deprecated alias there, to go in v6); before them only
    `gradient_checkpointing` exists and the new name is an unknown keyword (transformers 5.17 raised on it)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def padding_free_matches(model: Any, rows: list[dict[str, Any]]) -> bool:
    """Does `model` give the same loss on `rows` (input_ids + labels) packed into one row with position_ids as on
    the padded batch? True where its attention keeps packed sequences apart (transformers' sdpa/eager masks read
    the boundaries from position_ids, flash-attention its varlen kernel); checked, not assumed, per model."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = next(model.parameters()).device
    batches = [DataCollatorForLanguageModeling(pad_token_id=0, padding_free=free)(rows) for free in (True, False)]
    was_training = model.training
    model.eval()  # no dropout: the two forwards must be comparable
    try:
        with torch.no_grad():
            losses = [model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()},
                            use_cache=False).loss.float() for b in batches]
    finally:
        model.train(was_training)
    # fp32 agrees to ~1e-7; a leak across packed sequences moved a tiny random model's loss by 6e-4 relative
    tolerance = 1e-5 if next(model.parameters()).dtype == torch.float32 else 1e-2
    return bool(torch.isclose(losses[0], losses[1], rtol=tolerance, atol=0.0))


def callbacks(t: TrainSettings, run_dir: Path, has_eval: bool) -> list[Any]:
    from torch.utils.tensorboard import SummaryWriter
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback

    from align.runs import process_rank

    out: list[Any] = []
    if process_rank() == 0:  # one TensorBoard log per run, written by the main process
        out.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(run_dir) / "tb"))))
    if has_eval and t.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    out.append(run_callback())
    if [n for n in t.report_to if n != "tensorboard"]:  # MLflow / W&B, with the metric names every stage uses
        from align.tracking import trainer_callback

        out.append(trainer_callback(Path(run_dir), list(t.report_to)))
    return out


def diverged(logs: dict[str, Any], keys: tuple[str, ...] = ("loss", "grad_norm")) -> str | None:
    """'loss nan' / 'grad_norm inf' when one of the logged `keys` (a loss, a gradient norm) is no longer finite,
    else None."""
    bad = [f"{k} {logs[k]}" for k in keys
           if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])]
    return ", ".join(bad) or None


def grads_finite(params: Any, device: torch.device | str) -> torch.Tensor:
    """1 (an int32 tensor on `device`) when every gradient of `params` is finite, else 0, without waiting for the
    device. The largest |gradient| (the inf-norm: it cannot overflow, and a NaN or inf anywhere makes it non-finite)
    in torch's foreach kernels: 2 ms for 1.9B bf16 gradients on an H200, 8 ms for 8.2B (a fused AdamW step: 11 and
    44 ms), 1.2 ms for LoRA's 392 tensors; `isfinite().all()` per tensor took 11, 34 and 15 ms. On one CPU thread
    0.33 s for 124M fp32 gradients (AdamW step 0.5 s; the forward and backward take far longer). A sharded gradient
    (FSDP2's DTensor) is checked on this process's shard; parameters without a gradient count as finite."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.int32, device=device)
    inf = float("inf")
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        largest = torch.nn.utils.get_total_norm(grads, inf)
    else:
        largest = torch.stack([torch.linalg.vector_norm(g, inf).to(grads[0].device) for g in grads]).max()
    return torch.isfinite(largest).to(device=device, dtype=torch.int32)


def on_every_process(flag: torch.Tensor) -> bool:
    """The minimum of an int `flag` over all processes when torch.distributed runs (every process must call it, at
    the same point), else the flag itself: all processes take the same decision. One wait for the device."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_callback() -> Any:
    """A TrainerCallback that (1) records each checkpoint's file sizes and hashes when it is saved, (2) on
    SIGTERM/SIGINT/SIGUSR1 stops at the next step boundary: the Trainer saves a checkpoint and leaves its loop,
    then the run is marked `interrupted` and `runs.Interrupted` is raised (exit 130 from the CLI), and (3) stops a
    run whose gradients stopped being finite (checked before every optimizer step, on every process together) or
    whose logged loss or gradient norm did, without saving that step or any later one, with one line naming the
    step, the value and the fix (the last checkpoint saved before it stays)."""
    from transformers import TrainerCallback

    from align.errors import TrainingError
    from align.runs import at_step_boundaries, interrupt_active_runs, record_files, stop_requested

    class RunCallback(TrainerCallback):
        stopped_at: int | None = None
        divergence: str | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            at_step_boundaries(True)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                                  **kwargs: Any) -> None:
            # After clipping, before optimizer.step(). Under fp16 the loss scaler skips a step whose gradients
            # overflowed (a routine event there), so the weights stay finite without us.
            if args.fp16 or model is None or self.divergence is not None:
                return
            if on_every_process(grads_finite(model.parameters(), args.device)):
                return
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.stop_diverged(args, state.global_step + 1, "a gradient is nan or inf", control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if stop_requested(sync=True):
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step
            self.hold(control)  # DefaultFlowCallback (called before us) may have scheduled this step's save

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.hold(control)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            # fp16: an overflowed step's gradient norm is inf and the scaler skipped that step; the loss still shows
            what = diverged(logs or {}, ("loss",) if args.fp16 else ("loss", "grad_norm"))
            if what and self.divergence is None:
                self.stop_diverged(args, state.global_step, what, control)

        def stop_diverged(self, args: Any, step: int, what: str, control: Any) -> None:
            self.divergence = (f"training diverged at step {step} ({what}): lower train.lr (now "
                               f"{args.learning_rate:g}) or train.max_grad_norm, and run again with "
                               "overwrite=true; no checkpoint was saved from this step on")
            control.should_training_stop = True
            self.hold(control)

        def hold(self, control: Any) -> None:
            """Once diverged: no checkpoint (nor evaluation) of the weights from then on."""
            if self.divergence is not None:
                control.should_save = control.should_evaluate = False

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and (folder / "trainer_state.json").is_file():
                record_files(folder)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            at_step_boundaries(False)
            if self.divergence is not None:
                raise TrainingError(self.divergence)
            if self.stopped_at is not None:
                interrupt_active_runs(f" after step {self.stopped_at} (checkpoint "
                                      f"{Path(args.output_dir) / f'checkpoint-{self.stopped_at}'})")

    return RunCallback()


def evaluate_before_training(trainer: Any) -> dict[str, float]:
    """`trainer.evaluate()` before `trainer.train()`, leaving data-parallel training intact.

    transformers' evaluation loop prepares the bare model for evaluation, and accelerate marks it prepared; `train()`
    then skips wrapping it in DistributedDataParallel, so under several processes each one stepped on its own
    gradients (found 2026-12-04: 2 processes x batch 2 took a different step from 1 x batch 4). The mark and the
    registration the evaluation made are undone (and its mixed-precision forward, which `train()` adds again), so
    `train()` prepares the model as it would without the evaluation."""
    metrics = trainer.evaluate()
    model, accelerator = trainer.model, trainer.accelerator
    if trainer.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
        del model._is_accelerate_prepared
        accelerator._models[:] = [m for m in accelerator._models if m is not model]
        if "_original_forward" in vars(model):
            model.forward = vars(model).pop("_original_forward")
    return metrics


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest sound `checkpoints/checkpoint-N` folder, for resume. The Trainer writes trainer_state.json
    last, so a checkpoint without it whole (or without its RNG state) was torn by a kill or a full disk mid-save
    and is skipped; one whose files no longer match their record (rotted after it completed) is skipped with a
    line saying so."""
    from align.runs import newest_sound_checkpoint

    complete = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and _whole_json(p / "trainer_state.json")
                and any(p.glob("rng_state*.pth"))]
    found = newest_sound_checkpoint(complete, lambda p: int(p.name.split("-")[-1]))
    return str(found) if found else None


def _whole_json(path: Path) -> bool:
    """Is `path` a complete JSON file? (A full disk can cut trainer_state.json, the file written last.)"""
    import json

    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def history_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Flatten the Trainer's log history: the last value of every numeric key (e.g. eval_loss, train_loss)."""
    out: dict[str, float] = {}
    for entry in log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                out[k] = float(v)
    return out


def prompt_dataset(path: str) -> Any:
    """Prompt-only JSONL -> a TRL dataset with a conversational `prompt` column."""
    from datasets import Dataset

    from align.data.records import read_prompts

    return Dataset.from_list([{"prompt": r.prompt} for r in read_prompts(path)])


def check_online_config(stage: str, method: str, t: TrainSettings, num_generations: int) -> None:
    """GRPO / RLOO: a PEFT method they support, and whole groups of completions in every batch."""
    from align.models.policy import check_method

    check_method(stage, method)
    if t.forward_batch:
        raise ConfigError(f"train.forward_batch is not used by {stage} (its batches are groups of completions); "
                          "remove it")
    if t.batch_size * t.grad_accum % num_generations:
        raise ConfigError(f"train.batch_size × train.grad_accum must be a multiple of online.num_generations="
                          f"{num_generations}")


def vllm_kwargs(use_vllm: bool) -> dict[str, Any]:
    """TRL's own vLLM rollouts for GRPO/RLOO: one engine in the training process ("colocate"), weights synced by
    TRL after each optimizer step. Refused early without vllm or a GPU (TRL would fail deep inside its trainer)."""
    if not use_vllm:
        return {}
    from align.generation.vllm import vllm_available

    if not vllm_available():
        raise ConfigError("online.use_vllm=true needs the vllm package and a CUDA GPU (pip install -e '.[vllm]'); "
                          "set online.use_vllm=false to sample with transformers")
    return {"use_vllm": True, "vllm_mode": "colocate"}


def run_trl_online(stage: str, cfg: Any, trainer_cls: Any, config_cls: Any, algo: dict[str, Any]) -> Path:
    """GRPO and RLOO through TRL: load the policy + adapter, wrap the reward, train, save the adapter."""
    import torch

    from align.models.load import pick_dtype, resolve_model
    from align.models.peft import count_parameters
    from align.models.policy import load_policy, save_policy
    from align.rewards import load_reward, trl_reward_func
    from align.runs import start_run

    o = cfg.online
    dataset = prompt_dataset(cfg.data.prompts)
    source = resolve_model(cfg.policy)
    reward_fn, reward_from = load_reward(cfg.reward)
    run_ = start_run(stage, cfg, resume=cfg.resume)
    torch.manual_seed(cfg.seed)
    run_.add_input(cfg.data.prompts)
    run_.add_input(source)
    dtype = pick_dtype(cfg.dtype)
    policy = load_policy(source, stage=stage, peft=cfg.peft, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         total_steps=max(cfg.train.max_steps, 1))
    model, tokenizer, trained = policy.model, policy.tokenizer, policy.trained
    n_train, n_total = count_parameters(model)
    log.info(f"{stage}: {trained} ({n_train:,} of {n_total:,} parameters); reward: {reward_from}")

    args = config_cls(**trainer_kwargs(cfg.train, run_.dir, seed=cfg.seed, has_eval=False), **precision_flags(dtype),
                      num_generations=o.num_generations, max_completion_length=o.max_completion_length,
                      temperature=o.temperature, beta=o.beta, epsilon=o.epsilon, num_iterations=o.num_iterations,
                      mask_truncated_completions=o.mask_truncated_completions, **vllm_kwargs(o.use_vllm), **algo)
    trainer = trainer_cls(model=model, reward_funcs=[trl_reward_func(reward_fn, "reward")], args=args,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks(cfg.train, run_.dir, False))
    trainer.train(resume_from_checkpoint=last_checkpoint(run_.dir) if cfg.resume else None)
    if not run_.is_main:  # multi-process: the main process saves and reports
        return run_.dir

    out = save_policy(trainer.model, tokenizer, run_.dir / "model", method=cfg.peft.method, base=source)
    run_.add_output("model", out)
    history = [h for h in trainer.state.log_history if "reward" in h]
    run_.metrics.update(history_metrics(trainer.state.log_history))
    if history:
        run_.metrics.update({"first/reward": history[0]["reward"], "last/reward": history[-1]["reward"]})
    run_.metrics.update({"trainable_params": n_train, "total_params": n_total})
    run_.extra["reward"] = reward_from
    return run_.finish()
