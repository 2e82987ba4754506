"""reward: train a scalar reward model (Bradley-Terry) on preference pairs with TRL's RewardTrainer.

The base is the SFT output by default (an adapter is merged first) with a one-output score head. We tokenize
pairs ourselves with `align.reward_model.encode` so training and `RewardModel.score` see identical ids, and
compute the held-out metrics with `RewardModel` on the saved folder, so the numbers are the API's numbers. Next
to them, the same held-out pairs are scored by two free baselines (the base model's log p(chosen) − log p(rejected),
and "the longer answer wins"); a reward model that does not beat both is reported in one warning line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import DTYPE_HELP, VALIDATION_FRACTION_HELP, VALIDATION_HELP, Dtype, opt
from align.data.importers import split_by_prompt
from align.data.records import PreferenceRecord, read_preferences
from align.errors import DataError
from align.models.load import is_adapter, load_model, load_tokenizer, pick_dtype, resolve_model
from align.models.memory import release_freed_memory, release_memory_callback
from align.models.packed import padding_free_classifier
from align.models.peft import PeftSettings, adalora_callback, count_parameters
from align.models.policy import METHODS, check_method, load_policy, point_adapter_at
from align.reward_model import (
    RewardModel,
    baseline_accuracies,
    baseline_warning,
    calibration_table,
    check_tokenizer_fits,
    encode,
    heldout_metrics,
    response_lengths,
    response_logprobs,
)
from align.runs import Run, atomic_write_json, resolve_input, start_run
from align.training import (
    TrainSettings,
    callbacks,
    evaluate_before_training,
    history_metrics,
    last_checkpoint,
    longest_example,
    precision_flags,
    total_steps,
    trainer_kwargs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    train: str = opt("runs/import/train.jsonl", "preference JSONL (prompt, chosen, rejected), or an import run folder")
    validation: str = opt("runs/import/valid.jsonl", VALIDATION_HELP)
    validation_fraction: float = opt(0.15, VALIDATION_FRACTION_HELP + " (the reward model always validates)",
                                     gt=0.0, lt=1.0)
    max_length: int = opt(512, "max tokens of prompt + response; longer pairs are dropped (or an error)", ge=8)
    on_too_long: Literal["drop", "error"] = opt("drop", "drop | error: what to do with pairs longer than max_length")
    padding_free: bool = opt(True, "score each batch's sequences packed into one row (no compute or activation "
                                   "memory on padding); used only where a check on two pairs gives the padded scores")


@dataclass(frozen=True)
class Config:
    model: str = opt("runs/sft", "base: the SFT run folder (adapter merged), 'default', or a model folder")
    output_dir: str = opt("runs/reward", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder (off: only built-in architectures)")
    center_rewards_coefficient: float = opt(0.0, "push rewards towards mean zero (TRL; 0 = off, 0.01 typical)", ge=0.0)
    use_margin: bool = opt(False, "subtract meta.margin from r_chosen - r_rejected in the loss (0 where absent)")
    calibration_bins: int = opt(5, "bins of the held-out calibration table over confidence [0.5, 1]", ge=1, le=100)
    baselines: bool = opt(True, "also score the held-out pairs with two free baselines (the base model's "
                                "log p(chosen) - log p(rejected), and 'the longer answer wins') and say when the "
                                "reward model does not beat both")
    data: DataSettings = opt(DataSettings(), "preference data")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method (the score head is always trained)")
    train: TrainSettings = opt(TrainSettings(lr=1e-4, eval_steps=25, save_steps=50), "optimisation")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs

        check_method("reward", self.peft.method)


def resolve_data(path: str, names: tuple[str, ...]) -> Path:
    """A preference file, or a completed import / preferences / judge run folder's first output among `names`."""
    return resolve_input(path, what="preference data", stages=("import", "preferences", "judge"), outputs=names)


def tokenize_pairs(records: list[PreferenceRecord], tokenizer: Any, d: DataSettings, source: str,
                   use_margin: bool) -> tuple[list[dict[str, Any]], int]:
    """Rows of chosen_ids / rejected_ids (+ margin) for RewardTrainer; returns (rows, number dropped as too long)."""
    rows, dropped = [], 0
    for i, r in enumerate(records):
        chosen, rejected = encode(tokenizer, r.prompt, r.chosen), encode(tokenizer, r.prompt, r.rejected)
        longest = max(len(chosen), len(rejected))
        if longest > d.max_length:
            if d.on_too_long == "error":
                raise DataError(f"{r.meta.get('origin', f'{source} record {i + 1}')}: pair is {longest} tokens, "
                                f"longer than data.max_length={d.max_length}; raise it or set data.on_too_long=drop")
            dropped += 1
            continue
        row: dict[str, Any] = {"chosen_ids": chosen, "rejected_ids": rejected}
        if use_margin:
            row["margin"] = float(r.meta.get("margin") or 0.0)
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no usable preference pairs ({len(records)} read, {dropped} longer than "
                        f"data.max_length={d.max_length}); raise data.max_length or add pairs")
    return rows, dropped


def load_pairs(cfg: Config) -> tuple[Path, Path | None, list[PreferenceRecord], list[PreferenceRecord]]:
    train_path = resolve_data(cfg.data.train, ("train", "preferences"))
    train = read_preferences(train_path)
    if cfg.data.validation:
        val_path: Path | None = resolve_data(cfg.data.validation, ("valid", "validation"))
        return train_path, val_path, train, read_preferences(val_path)
    train, val = split_by_prompt(train, cfg.data.validation_fraction, cfg.seed)
    if not val:
        raise DataError(f"{train_path}: data.validation='' needs at least 2 distinct prompts to hold some out; "
                        f"give data.validation=FILE")
    return train_path, None, train, val


def run(cfg: Config) -> Path:
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    train_path, val_path, train_records, val_records = load_pairs(cfg)
    base = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    if not tokenizer.chat_template:
        raise DataError(f"model {base} has no chat template; a reward model scores prompt + response "
                        f"conversations, so use a chat model (or its SFT run) as the base")
    check_tokenizer_fits(tokenizer, base, str(base))
    train_rows, dropped = tokenize_pairs(train_records, tokenizer, cfg.data, str(train_path), cfg.use_margin)
    val_rows, val_dropped = tokenize_pairs(val_records, tokenizer, cfg.data, str(val_path or "held-out split"),
                                           cfg.use_margin)

    torch.manual_seed(cfg.seed)  # the score head is initialised at random
    dtype = pick_dtype(cfg.dtype)
    run_ = start_run("reward", cfg, resume=cfg.resume)  # only now: bad input above leaves no half-made run folder
    for p in (train_path, val_path, base):
        if p is not None:
            run_.add_input(p)
    policy = load_policy(base, stage="reward", peft=cfg.peft, dtype=cfg.dtype, kind="classifier",
                         trust_remote_code=cfg.trust_remote_code, total_steps=total_steps(len(train_rows), cfg.train))
    model, trained_what = policy.model, policy.trained
    trainable, total = count_parameters(model)
    log.info(f"reward: {len(train_rows)} train / {len(val_rows)} held-out pairs ({dropped + val_dropped} too long); "
             f"peft.method={cfg.peft.method}: training {trained_what} — {trainable:,} of {total:,} parameters")

    # the loss is a mean over pairs: passes of fewer pairs sum to the batch's gradient (chosen + rejected per pair)
    pair_tokens = longest_example((len(r[k]) for r in train_rows for k in ("chosen_ids", "rejected_ids")), 2)
    args = RewardConfig(**trainer_kwargs(cfg.train, run_.dir, seed=cfg.seed, has_eval=True,
                                         example_tokens=pair_tokens), **precision_flags(dtype),
                        max_length=None, disable_dropout=True,
                        center_rewards_coefficient=cfg.center_rewards_coefficient or None)
    extra = [adalora_callback(model)] if cfg.peft.method == "adalora" else []
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(val_rows), processing_class=tokenizer,
                            callbacks=callbacks(cfg.train, run_.dir, True) + extra + [release_memory_callback()])
    if cfg.peft.method == "qlora":
        # TRL casts a quantized model's trainable weights to bf16 (fine for LoRA layers, which cast their input),
        # but the plain score Linear then meets the fp32 hidden states of the k-bit-prepared body.
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ".score." in f".{name}":
                p.data = p.data.float()
    if cfg.data.padding_free and not padding_free_classifier(trainer.model, probe_batch(train_rows, tokenizer,
                                                                                      trainer.model)):
        log.info("reward: padded batches (this model's attention mixes sequences packed into one row); "
                 "data.padding_free=false silences this")
    checkpoint = last_checkpoint(run_.dir) if cfg.resume else None
    before = evaluate_before_training(trainer) if checkpoint is None else {}
    trainer.train(resume_from_checkpoint=checkpoint)
    release_freed_memory()  # the reloads below reuse what training freed instead of stacking on top of it
    if not run_.is_main:  # multi-process: the main process saves and reports
        return run_.dir

    save_model(trainer.model, tokenizer, base, cfg, run_)
    reward_model = RewardModel.load(run_.dir / "model", batch_size=cfg.train.batch_size)
    chosen, rejected = reward_model.score_preferences(val_records)
    report_heldout(run_, chosen, rejected, cfg.calibration_bins, trainer.state.global_step)
    del reward_model
    warning = report_baselines(run_, base, tokenizer, val_records, cfg) if cfg.baselines else None

    run_.metrics.update(history_metrics(trainer.state.log_history))
    run_.metrics.update({f"{k}_before": before[k] for k in ("eval_accuracy", "eval_margin", "eval_loss") if k in before})
    run_.metrics.update({"global_step": trainer.state.global_step, "trainable_params": trainable,
                         "total_params": total, "train_pairs": len(train_rows), "validation_pairs": len(val_rows),
                         "dropped_too_long": dropped + val_dropped})
    run_.extra["peft"] = {"method": cfg.peft.method, "trained": trained_what}
    run_.extra["resumed_from"] = checkpoint
    m = run_.metrics
    print(f"held-out pairwise accuracy {m['heldout_accuracy']:.3f} (mean margin {m['heldout_margin_mean']:.3f}, "
          f"ECE {m['heldout_ece']:.3f}) on {len(val_records)} pairs; model saved to {run_.dir / 'model'}", flush=True)
    if cfg.baselines:
        print(f"free baselines on the same pairs: base-model log-likelihood ratio "
              f"{m['heldout_baseline_loglik_ratio_accuracy']:.3f}, longer answer wins "
              f"{m['heldout_baseline_longer_wins_accuracy']:.3f}", flush=True)
    if warning:
        log.warning(f"reward: {warning}")
    return run_.finish()


def probe_batch(rows: list[dict[str, Any]], tokenizer: Any, model: Any) -> dict[str, Any]:
    """The first two pairs as RewardTrainer batches them (input_ids + attention_mask, right-padded)."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([
        {"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows[:2]])
    device = next(model.parameters()).device
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def save_model(model: Any, tokenizer: Any, base: Path, cfg: Config, run_: Run) -> None:
    """model/: a plain AutoModelForSequenceClassification folder (adapters merged in, float32). For adapter methods
    also adapter/ (the unmerged adapter) and, when the base was itself an adapter, base/ (that base merged) for it."""
    from peft import PeftModel

    out = run_.dir / "model"
    if not METHODS[cfg.peft.method].adapter:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
    else:
        adapter_dir = run_.dir / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        # Merge into a float32 reload of the base: folding the LoRA delta into bf16 weights rounds much of it away
        # (on the demo, the held-out mean margin fell from 4.29 to 3.78), and a 4-bit QLoRA base cannot be saved.
        fresh = load_model(base, dtype="float32", kind="classifier", merge=True,
                           trust_remote_code=cfg.trust_remote_code)
        adapter_base = base.resolve()
        fresh.config.pad_token_id = tokenizer.pad_token_id
        if is_adapter(base):
            fresh.save_pretrained(run_.dir / "base", safe_serialization=True)
            tokenizer.save_pretrained(run_.dir / "base")
            adapter_base = (run_.dir / "base").resolve()
            run_.add_output("base", run_.dir / "base")
        point_adapter_at(adapter_dir, adapter_base)
        merged = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
        merged.config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(out, safe_serialization=True)
        run_.add_output("adapter", adapter_dir)
    tokenizer.save_pretrained(out)
    run_.add_output("model", out)


def report_baselines(run_: Run, base: Path, tokenizer: Any, records: list[PreferenceRecord],
                     cfg: Config) -> str | None:
    """The held-out accuracy of the free baselines into the manifest (heldout_baseline_*_accuracy, and
    extra.baselines); returns the one-line warning when the reward model does not beat both, else None."""
    import torch

    lm = load_policy(base, stage="reward", dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code).model
    lm = lm.to("cuda") if torch.cuda.is_available() else lm
    logp = response_logprobs(lm, tokenizer, records, batch_size=cfg.train.batch_size)
    del lm
    accuracy = baseline_accuracies(*logp, *response_lengths(tokenizer, records))
    run_.metrics.update({f"heldout_baseline_{k}_accuracy": v for k, v in accuracy.items()})
    warning = baseline_warning(run_.metrics["heldout_accuracy"], accuracy)
    run_.extra["baselines"] = {"base_model": str(base), "accuracy": accuracy, "beats_both": warning is None}
    return warning


def report_heldout(run_: Run, chosen: list[float], rejected: list[float], bins: int, step: int) -> None:
    """Held-out metrics into the manifest (heldout_*), TensorBoard (heldout/*) and calibration.json."""
    from torch.utils.tensorboard import SummaryWriter

    metrics = heldout_metrics(chosen, rejected, bins)
    table = calibration_table(chosen, rejected, bins)
    atomic_write_json(run_.dir / "calibration.json", {
        "definition": "per held-out pair, p = sigmoid(r_chosen - r_rejected); confidence = max(p, 1 - p); "
                      "accuracy = fraction where the preferred response is the labelled chosen one",
        "pairs": len(chosen), "ece": metrics["ece"], "bins": table})
    run_.add_output("calibration", run_.dir / "calibration.json")
    run_.metrics.update({f"heldout_{k}": v for k, v in metrics.items()})
    writer = SummaryWriter(log_dir=str(run_.dir / "tb"))
    for k, v in metrics.items():
        writer.add_scalar(f"heldout/{k}", v, step)
    writer.close()
