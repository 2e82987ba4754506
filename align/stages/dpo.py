"""DPO: direct preference optimisation with TRL's DPOTrainer on the canonical preference files, LoRA actor.

The policy starts from the SFT output (an adapter is merged first) with a fresh adapter; the reference is the
same weights without that adapter's effect, so no second model is loaded. (TRL 1.16 keeps a frozen copy of the
fresh adapter as its "ref" adapter; a fresh LoRA/DoRA is an identity, so that equals the adapter-disabled model.)

β: the loss sees the implicit reward r(x, y) = β·log(π(y|x) / π_ref(y|x)). Larger β keeps the policy closer to
the reference (the sigmoid loss saturates after smaller log-ratio changes); smaller β lets it move further.
Typical: 0.1 (sigmoid), 0.1-0.5 for ipo (where β is the regulariser τ), 0.1 with label_smoothing 0.1 (robust).

sft_weight (RPO): adds w·(mean NLL of the chosen tokens) to the loss. Plain DPO only widens the gap between chosen
and rejected and can lower both; on small data with one strong cue (the demo's "Tip:" sentence, present in every
chosen answer and no rejected one) the policy then drifts into degenerate text ("Tip: Tip: Tip: ...") and stops
ending its answers. The NLL term keeps the chosen answers, their end-of-turn included, likely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.chat import SYSTEM_PROMPT_HELP
from align.config import DTYPE_HELP, VALIDATION_FRACTION_HELP, VALIDATION_HELP, Dtype, opt
from align.data.importers import split_by_prompt
from align.data.records import PreferenceRecord, read_preferences, read_prompts
from align.errors import ConfigError
from align.generation import SamplingSettings
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.training import TrainSettings

log = logging.getLogger(__name__)

LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@dataclass(frozen=True)
class DataSettings:
    train: str = opt("runs/import/train.jsonl", "canonical preference JSONL (prompt, chosen, rejected)")
    validation: str = opt("runs/import/valid.jsonl", VALIDATION_HELP)
    validation_fraction: float = opt(0.1, VALIDATION_FRACTION_HELP + " (0: no validation)", ge=0.0, lt=1.0)
    max_length: int = opt(512, "max tokens of prompt + response; longer pairs are truncated by TRL", ge=8)
    padding_free: bool = opt(True, "run each batch's chosen and rejected sequences packed into one row (no compute "
                                   "or activation memory on padding); used only where a check on two pairs gives "
                                   "the padded log-probs")


@dataclass(frozen=True)
class DPOSettings:
    beta: float = opt(0.1, "strength of the pull towards the reference: implicit reward = β·log(π/π_ref); "
                           "larger β = smaller steps away from the reference (ipo: the regulariser τ)", gt=0.0)
    loss_type: LossType = opt("sigmoid", "sigmoid (DPO) | ipo | hinge (SLiC) | robust (noisy labels, use "
                                    "label_smoothing) | exo_pair | nca_pair | bco_pair | sppo_hard | aot | apo_zero "
                                    "| apo_down | discopop | sigmoid_norm")
    label_smoothing: float = opt(0.0, "robust/exo: assumed probability that a label is flipped (robust: < 0.5)", ge=0.0, lt=0.5)
    sft_weight: float = opt(0.0, "weight of an NLL loss on the chosen responses added to the preference loss "
                                 "(RPO); > 0 keeps the chosen likely, against DPO's drift into degenerate text", ge=0.0)


@dataclass(frozen=True)
class EvalSettings:
    prompts: str = opt("data/prompts/eval.jsonl", "held-out prompts for the reward before/after check")
    size: int = opt(16, "held-out prompts to sample (0: skip the check)", ge=0)
    reward: RewardSettings = opt(RewardSettings(), "reward for the check (the trained reward model by default)")
    sampling: SamplingSettings = opt(SamplingSettings(max_new_tokens=64), "sampling for the check")


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/dpo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    system_prompt: str = opt("", SYSTEM_PROMPT_HELP)
    data: DataSettings = opt(DataSettings(), "preference data")
    dpo: DPOSettings = opt(DPOSettings(), "the DPO loss")
    peft: PeftSettings = opt(PeftSettings(), "parameter-efficient method (the reference is adapter-disabled)")
    train: TrainSettings = opt(TrainSettings(lr=5e-5), "optimisation")
    eval: EvalSettings = opt(EvalSettings(), "held-out reward before/after training")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs
        from align.models.policy import check_method

        check_method("dpo", self.peft.method)
        if self.train.forward_batch not in (0, self.train.batch_size) and not per_pair_loss(self.dpo):
            raise ConfigError(f"train.forward_batch={self.train.forward_batch} would change the loss "
                              f"{loss_name(self.dpo)}: {BATCH_LEVEL_HELP}; leave train.forward_batch at 0")


# Loss terms that are not a mean of per-pair terms: aot/aot_unpaired sort the log-ratios across the batch, the
# RPO/"sft" term averages over all the batch's chosen tokens. Split into passes, each would see only its own pairs.
BATCH_LEVEL = ("aot", "aot_unpaired")
BATCH_LEVEL_HELP = "aot/aot_unpaired and dpo.sft_weight > 0 couple the pairs of a batch, so it runs in one pass"


def per_pair_loss(settings: DPOSettings) -> bool:
    """Is the loss a mean of per-pair terms (the same update when a batch runs as several passes)?"""
    return settings.sft_weight == 0 and settings.loss_type not in BATCH_LEVEL


def preference_path(path: str, outputs: tuple[str, ...]) -> Path:
    """A preference JSONL, or a completed import / preferences / judge run folder's output among `outputs`."""
    from align.runs import resolve_input

    return resolve_input(path, what="preference data", stages=("import", "preferences", "judge"), outputs=outputs)


def preference_dataset(records: list[PreferenceRecord], system_prompt: str = "") -> Any:
    """Canonical preference records -> a conversational TRL dataset (prompt / chosen / rejected messages), with
    `system_prompt` first in every prompt that has no system message."""
    from datasets import Dataset

    from align.chat import with_system_prompt

    return Dataset.from_list([{"prompt": with_system_prompt(r.prompt, system_prompt), "chosen": r.chosen,
                               "rejected": r.rejected} for r in records])


def preference_splits(data: DataSettings, seed: int, system_prompt: str = "") -> tuple[Path, Path | None, Any, Any]:
    """(train file, validation file or None, train dataset, validation dataset or None) as `data` asks."""
    train_path = preference_path(data.train, ("train", "preferences"))
    train = read_preferences(train_path)
    if data.validation:
        val_path = preference_path(data.validation, ("valid", "validation"))
        return (train_path, val_path, preference_dataset(train, system_prompt),
                preference_dataset(read_preferences(val_path), system_prompt))
    train, val = split_by_prompt(train, data.validation_fraction, seed)
    return (train_path, None, preference_dataset(train, system_prompt),
            preference_dataset(val, system_prompt) if val else None)


def loss_kwargs(settings: DPOSettings) -> dict[str, Any]:
    """TRL's loss_type / loss_weights: the preference loss, plus its "sft" loss when sft_weight > 0."""
    if settings.sft_weight > 0:
        return {"loss_type": [settings.loss_type, "sft"], "loss_weights": [1.0, settings.sft_weight]}
    return {"loss_type": [settings.loss_type]}


def loss_name(settings: DPOSettings) -> str:
    return settings.loss_type + (f" + {settings.sft_weight:g}·NLL(chosen)" if settings.sft_weight > 0 else "")


def run(cfg: Config) -> Path:
    import torch
    from trl import DPOConfig, DPOTrainer

    from align.models.lm_head import compact_lm_head, pack_rows
    from align.models.load import pick_dtype, resolve_model
    from align.models.memory import release_memory_callback
    from align.models.peft import count_parameters
    from align.models.policy import load_policy, save_policy
    from align.rewards import check_reward
    from align.runs import start_run
    from align.training import (
        callbacks,
        history_metrics,
        last_checkpoint,
        longest_example,
        precision_flags,
        total_steps,
        trainer_kwargs,
    )

    train_path, val_path, train_ds, val_ds = preference_splits(cfg.data, cfg.seed, cfg.system_prompt)
    source = resolve_model(cfg.policy)
    if cfg.eval.size > 0:
        check_reward(cfg.eval.reward)  # not after an hour of training
        read_prompts(cfg.eval.prompts)

    run_ = start_run("dpo", cfg, resume=cfg.resume)
    torch.manual_seed(cfg.seed)
    for path in (train_path, val_path, source):
        if path:
            run_.add_input(path)
    dtype = pick_dtype(cfg.dtype)
    policy = load_policy(source, stage="dpo", peft=cfg.peft, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         total_steps=total_steps(len(train_ds), cfg.train))
    model, ref_model, tokenizer, trained = policy.model, policy.reference, policy.tokenizer, policy.trained
    n_train, n_total = count_parameters(model)
    log.info(f"dpo: {trained} ({n_train:,} of {n_total:,} parameters); loss {loss_name(cfg.dpo)}, β={cfg.dpo.beta}; "
             f"{len(train_ds)} pairs")

    example_tokens = longest_example(sequence_lengths(train_ds, tokenizer, cfg.data.max_length), 2) \
        if per_pair_loss(cfg.dpo) else None
    args = DPOConfig(**trainer_kwargs(cfg.train, run_.dir, seed=cfg.seed, has_eval=val_ds is not None,
                                      example_tokens=example_tokens),
                     **precision_flags(dtype), beta=cfg.dpo.beta, **loss_kwargs(cfg.dpo),
                     label_smoothing=cfg.dpo.label_smoothing, max_length=cfg.data.max_length)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer,
                         callbacks=callbacks(cfg.train, run_.dir, val_ds is not None) + [release_memory_callback()])
    fast_reference(trainer)
    compact_lm_head(trainer.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    if cfg.data.padding_free and not pack_rows(trainer.model, probe_batch(trainer)):
        log.info("dpo: padded batches (packing needs the compact CPU LM head and attention that keeps packed "
                 "sequences apart); data.padding_free=false silences this")
    if trainer.ref_model is not None:
        compact_lm_head(trainer.ref_model)
    # No evaluation before training: with a fresh adapter the policy IS the reference, so every implicit reward
    # is 0, the sigmoid loss is ln 2 and the accuracy 0 (ties) — known without a pass over the validation set.
    trainer.train(resume_from_checkpoint=last_checkpoint(run_.dir) if cfg.resume else None)
    final_eval = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    after = final_eval[-1] if final_eval else trainer.evaluate() if val_ds is not None else {}
    if not run_.is_main:  # multi-process: the main process saves and reports
        return run_.dir

    out = save_policy(trainer.model, tokenizer, run_.dir / "model", method=cfg.peft.method, base=source)
    run_.add_output("model", out)
    run_.metrics.update(history_metrics(trainer.state.log_history))
    first = next((h for h in trainer.state.log_history if "loss" in h), {})
    run_.metrics.update({f"first/{k}": first[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in first})
    run_.metrics.update({"trainable_params": n_train, "total_params": n_total, "train_pairs": len(train_ds)})
    if cfg.eval.size > 0:
        held_out_check(cfg, run_, trainer.model, ref_model, tokenizer)
    if after:
        start = " (ln 2 = 0.6931 before training)" if cfg.dpo.loss_type == "sigmoid" and cfg.dpo.sft_weight == 0 else ""
        print(f"dpo: validation loss {after['eval_loss']:.4f}{start}, reward accuracy "
              f"{after.get('eval_rewards/accuracies', float('nan')):.3f}, margin "
              f"{after.get('eval_rewards/margins', float('nan')):.3f}", flush=True)
    log.info(f"dpo: model saved to {out}")
    return run_.finish()


def sequence_lengths(dataset: Any, tokenizer: Any, max_length: int) -> Iterator[int]:
    """Tokens of every prompt + chosen and prompt + rejected sequence of a preference dataset, as DPOTrainer
    truncates them (to max_length)."""
    from align.reward_model import encode

    for row in dataset:
        for response in (row["chosen"], row["rejected"]):
            yield min(max_length, len(encode(tokenizer, row["prompt"], response)))


def probe_batch(trainer: Any) -> dict[str, Any]:
    """The first two training pairs as DPOTrainer batches them: input_ids, attention_mask, labels (completion)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(2, len(trainer.train_dataset)))])
    device = next(trainer.model.parameters()).device
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100).to(device)}


def fast_reference(trainer: Any) -> None:
    """TRL copies a PEFT model's adapter into a frozen "ref" adapter and runs it for every reference pass. Our
    adapter is always fresh (`load_policy`), an identity at init, so the adapter-disabled model is the same
    reference without the adapter's compute: TRL uses that when there is no "ref" adapter."""
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def held_out_check(cfg: Config, run_: Any, model: Any, reference: Any, tokenizer: Any) -> None:
    """Reward of the reference's and the policy's samples on held-out prompts, and the policy's KL."""
    from align.data.records import write_jsonl
    from align.rewards import load_reward
    from align.rlhf.evaluate import evaluate_policy

    reward_fn, reward_from = load_reward(cfg.eval.reward)
    prompts = [r.prompt for r in read_prompts(cfg.eval.prompts)[: cfg.eval.size]]
    metrics, rows = evaluate_policy(model, reference, tokenizer, prompts, cfg.eval.sampling, reward_fn)
    write_jsonl(run_.dir / "eval_samples.jsonl", rows)
    run_.metrics.update(metrics)
    run_.extra["eval_reward"] = reward_from
    print(f"dpo: held-out reward ({reward_from}) {metrics['eval/reward_before']:.4f} -> "
          f"{metrics['eval/reward_after']:.4f}, KL to reference {metrics['eval/kl']:.4f}", flush=True)
