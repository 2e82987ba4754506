"""Shared settings and plumbing for the stages that train with a (TRL) Trainer: SFT, reward, DPO, GRPO, RLOO."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import opt


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = opt(1.0, "passes over the training data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: use epochs)")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    batch_size: int = opt(8, "examples per device per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup_ratio: float = opt(0.05, "fraction of steps with linear warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    lr_scheduler: str = opt("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    eval_steps: int = opt(20, "evaluate on the validation split every N steps (0: only at the end)")
    logging_steps: int = opt(5, "log training metrics every N steps")
    save_steps: int = opt(50, "write a resumable checkpoint every N steps")
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0: off)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    progress: bool = opt(True, "show a progress bar")


def precision_flags(dtype: torch.dtype) -> dict[str, bool]:
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def trainer_kwargs(t: TrainSettings, run_dir: Path, *, seed: int, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, ...)."""
    eval_every = t.eval_steps if t.eval_steps > 0 else None
    strategy = ("steps" if eval_every else "epoch") if has_eval else "no"
    kwargs: dict[str, Any] = {
        "output_dir": str(Path(run_dir) / "checkpoints"),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "learning_rate": t.lr,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "lr_scheduler_type": t.lr_scheduler,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "eval_strategy": strategy,
        "eval_steps": eval_every,
        "save_strategy": strategy if (has_eval and t.early_stopping_patience) else "steps",
        "save_steps": eval_every if (has_eval and t.early_stopping_patience and eval_every) else t.save_steps,
        "save_total_limit": 2,
        "load_best_model_at_end": bool(has_eval and t.early_stopping_patience),
        "metric_for_best_model": "eval_loss" if has_eval else None,
        "greater_is_better": False,
        "report_to": "none",  # TensorBoard is attached explicitly (tb_callback) so the logs land in the run folder
        "disable_tqdm": not t.progress,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "save_only_model": False,
    }
    # TRL turns checkpointing on by default; we choose explicitly (prefix tuning breaks under it).
    kwargs["activation_checkpointing"] = t.gradient_checkpointing
    return kwargs


def callbacks(t: TrainSettings, run_dir: Path, has_eval: bool) -> list[Any]:
    from torch.utils.tensorboard import SummaryWriter
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback

    out: list[Any] = [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(run_dir) / "tb")))]
    if has_eval and t.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return out


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest `checkpoints/checkpoint-N` folder, for resume."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return str(ckpts[-1]) if ckpts else None


def history_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Flatten the Trainer's log history: the last value of every numeric key (e.g. eval_loss, train_loss)."""
    out: dict[str, float] = {}
    for entry in log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                out[k] = float(v)
    return out
