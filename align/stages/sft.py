"""SFT: supervised fine-tuning with TRL's SFTTrainer and any PEFT method.

Loss is on assistant tokens only by default: we tokenize each conversation with the chat template ourselves
(so over-long examples are reported by file:line) and hand TRL `input_ids` + `labels`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from align.chat import CHAT_TEMPLATE_HELP, SYSTEM_PROMPT_HELP, use_chat_template, with_system_prompt
from align.config import DTYPE_HELP, VALIDATION_FRACTION_HELP, VALIDATION_HELP, Dtype, opt
from align.data.records import Message, SFTExample, read_sft
from align.errors import DataError
from align.models.lm_head import compact_lm_head
from align.models.load import chat_ids, load_tokenizer, pick_dtype, resolve_model
from align.models.peft import (
    ADAPTER_METHODS,
    MERGEABLE_METHODS,
    PeftSettings,
    adalora_callback,
    changed_tensors,
    count_parameters,
    param_checksums,
)
from align.models.policy import METHODS, check_method, load_policy, save_policy
from align.runs import start_run
from align.training import (
    TrainSettings,
    callbacks,
    evaluate_before_training,
    history_metrics,
    last_checkpoint,
    longest_example,
    padding_free_matches,
    precision_flags,
    total_steps,
    trainer_kwargs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    train: str = opt("data/sft/train.jsonl", "training JSONL: {messages} or {prompt, completion} per line")
    validation: str = opt("data/sft/valid.jsonl", VALIDATION_HELP)
    validation_fraction: float = opt(0.1, VALIDATION_FRACTION_HELP + " (SFT always validates)", gt=0.0, lt=1.0)
    max_length: int = opt(512, "max tokens per example; longer examples are an error (or dropped, see on_too_long)", ge=8)
    on_too_long: Literal["error", "drop"] = opt("error", "error | drop: what to do with examples longer than max_length")
    loss_on: Literal["assistant", "all"] = opt("assistant", "assistant (loss on assistant tokens only) | all (every token)")
    padding_free: bool = opt(True, "pack each batch into one row with position_ids (no compute on padding); used "
                                   "only where a check on two examples gives the padded loss (else padded batches)")


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "'default' (SmolLM2-135M-Instruct), a local model folder, or a run folder")
    output_dir: str = opt("runs/sft", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder (off: only built-in architectures)")
    neftune_noise_alpha: float = opt(0.0, "NEFTune embedding noise (0: off; 5 is typical)", ge=0.0)
    chat_template: str = opt("", CHAT_TEMPLATE_HELP)
    system_prompt: str = opt("", SYSTEM_PROMPT_HELP)
    data: DataSettings = opt(DataSettings(), "training data")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method")
    train: TrainSettings = opt(TrainSettings(), "optimisation")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs

        check_method("sft", self.peft.method)


def tokenize_conversation(tokenizer: Any, messages: list[Message], loss_on: str) -> tuple[list[int], list[int]]:
    """Chat-template `messages`; return (input_ids, labels) with -100 outside assistant turns (loss_on=assistant).

    Each assistant turn's tokens are found as the difference between the templated conversation up to that turn
    and the templated prefix with the generation prompt, which needs a prefix-consistent template (ChatML is).
    """
    ids = chat_ids(tokenizer, messages)
    if loss_on == "all":
        return ids, list(ids)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        start, end = len(prefix), len(chat_ids(tokenizer, messages[: i + 1]))
        if ids[:start] != prefix:
            raise DataError("the chat template is not prefix-consistent; use data.loss_on=all")
        labels[start:end] = ids[start:end]
    return ids, labels


def build_dataset(examples: list[SFTExample], tokenizer: Any, d: DataSettings) -> tuple[Any, int, int]:
    """Tokenize examples into a datasets.Dataset; returns (dataset, n_tokens, n_dropped)."""
    from datasets import Dataset

    rows, tokens, dropped = [], 0, 0
    for ex in examples:
        ids, labels = tokenize_conversation(tokenizer, ex.messages, d.loss_on)
        if len(ids) > d.max_length:
            if d.on_too_long == "drop":
                dropped += 1
                continue
            raise DataError(f"{ex.origin}: example is {len(ids)} tokens, longer than data.max_length="
                            f"{d.max_length}; raise data.max_length, shorten it, or set data.on_too_long=drop")
        if all(x == -100 for x in labels):
            raise DataError(f"{ex.origin}: no assistant tokens to learn from")
        rows.append({"input_ids": ids, "labels": labels})
        tokens += len(ids)
    return Dataset.from_list(rows), tokens, dropped


def split_examples(examples: list[SFTExample], fraction: float, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def run(cfg: Config) -> Path:
    import torch
    from trl import SFTConfig, SFTTrainer

    train_examples = read_sft(cfg.data.train)
    if cfg.data.validation:
        val_examples = read_sft(cfg.data.validation)
    else:
        train_examples, val_examples = split_examples(train_examples, cfg.data.validation_fraction, cfg.seed)

    base = resolve_model(cfg.model)  # everything is checked before the run folder exists
    tokenizer = use_chat_template(load_tokenizer(base, cfg.trust_remote_code), cfg.chat_template, cfg.model)
    if cfg.system_prompt:
        train_examples = [replace(e, messages=with_system_prompt(e.messages, cfg.system_prompt)) for e in train_examples]
        val_examples = [replace(e, messages=with_system_prompt(e.messages, cfg.system_prompt)) for e in val_examples]
    train_ds, n_tokens, n_dropped = build_dataset(train_examples, tokenizer, cfg.data)
    val_ds, _, _ = build_dataset(val_examples, tokenizer, cfg.data)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError(f"{cfg.data.train}: no training or validation examples left (every one longer than "
                        f"data.max_length={cfg.data.max_length}?)")

    run_ = start_run("sft", cfg, resume=cfg.resume)
    torch.manual_seed(cfg.seed)
    for path in (cfg.data.train, cfg.data.validation, base):
        if path:
            run_.add_input(path)
    dtype = pick_dtype(cfg.dtype)
    policy = load_policy(base, stage="sft", peft=cfg.peft, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         total_steps=total_steps(len(train_ds), cfg.train))
    model, trained_what = policy.model, policy.trained
    trainable, total = count_parameters(model)
    log.info(f"peft.method={cfg.peft.method}: training {trained_what} — {trainable:,} of {total:,} parameters "
             f"({100 * trainable / total:.3f}%)")

    free = use_padding_free(cfg, model, train_ds)
    # Lengths were checked above (data.max_length); padding-free batches are not truncated again by TRL.
    # the loss is a mean over the batch's tokens, counted across passes (num_items_in_batch): the same gradient
    args = SFTConfig(**trainer_kwargs(cfg.train, run_.dir, seed=cfg.seed, has_eval=True,
                                      example_tokens=longest_example(map(len, train_ds["input_ids"]))),
                     **precision_flags(dtype), max_length=None if free else cfg.data.max_length,
                     neftune_noise_alpha=cfg.neftune_noise_alpha or None, packing=False, padding_free=free)
    extra = [adalora_callback(model)] if cfg.peft.method == "adalora" else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, callbacks=callbacks(cfg.train, run_.dir, True) + extra)
    compact_lm_head(trainer.model, outputs=("log_probs", "entropy", "is_top1"))
    before = evaluate_before_training(trainer)["eval_loss"]
    checksums = param_checksums(trainer.model)
    trainer.train(resume_from_checkpoint=last_checkpoint(run_.dir) if cfg.resume else None)
    final = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    after = final[-1]["eval_loss"] if final else trainer.evaluate()["eval_loss"]  # not twice at the last step
    if not run_.is_main:  # multi-process: the main process saves and reports
        return run_.dir
    # probe first: it puts the model in eval mode, as it was when checksummed before training (bitsandbytes' CPU
    # 4-bit weights read differently after training-mode passes until the model is back in eval mode)
    run_.extra["probe"] = probe_logits(trainer.model, val_ds[0]["input_ids"])
    run_.metrics.update(changed_tensors(checksums, param_checksums(trainer.model)))

    out = save_policy(trainer.model, tokenizer, run_.dir / "model", method=cfg.peft.method, base=base)
    run_.add_output("model", out)
    run_.metrics.update(history_metrics(trainer.state.log_history))
    run_.metrics.update({"eval_loss_before": before, "eval_loss_after": after, "trainable_params": trainable,
                         "total_params": total, "trainable_fraction": trainable / total,
                         "train_examples": len(train_ds), "validation_examples": len(val_ds),
                         "train_tokens": n_tokens, "dropped_too_long": n_dropped,
                         "train_tokens_per_second": tokens_per_second(trainer, n_tokens / len(train_ds))})
    run_.extra["peft"] = {"method": cfg.peft.method, "trained": trained_what, "adapter": METHODS[cfg.peft.method].adapter}
    print(f"validation loss {before:.4f} -> {after:.4f}; model saved to {out}", flush=True)
    return run_.finish()


def use_padding_free(cfg: Config, model: Any, dataset: Any) -> bool:
    """Padding-free batches when asked for and exact here: not with prompt-learning methods (their virtual tokens
    open each row) or NEFTune (its noise scales with the row length), and only if the model's attention keeps the
    packed sequences apart (`padding_free_matches`); says so when it falls back to padded batches."""
    if not cfg.data.padding_free:
        return False
    why = ("peft.method=" + cfg.peft.method if cfg.peft.method in ADAPTER_METHODS - MERGEABLE_METHODS
           else "neftune_noise_alpha > 0" if cfg.neftune_noise_alpha else "")
    if not why and not padding_free_matches(model, [dataset[i] for i in range(min(3, len(dataset)))]):
        why = "this model's attention ignores sequence boundaries in a packed row"
    if why:
        log.info(f"sft: padded batches ({why}); data.padding_free=false silences this")
    return not why


def probe_logits(model: Any, input_ids: list[int]) -> dict[str, Any]:
    """Last-position logits on one validation example, so a reload can be checked against the trained model."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids], device=device)).logits[0, -1].float()
    return {"input_ids": list(input_ids), "logits_head": logits[:16].tolist(), "logits_sum": float(logits.sum())}


def tokens_per_second(trainer: Any, mean_tokens: float) -> float:
    """Training throughput: examples seen (steps x batch x accumulation) x mean length / train runtime."""
    runtime = next((e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), 0.0)
    a = trainer.args
    seen = trainer.state.global_step * a.per_device_train_batch_size * a.gradient_accumulation_steps
    return seen * mean_tokens / runtime if runtime else 0.0
