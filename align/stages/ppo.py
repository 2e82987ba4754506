"""PPO: our own RLHF loop — LoRA actor, adapter-disabled reference, value head, KL-penalised reward, GAE.

One step: sample responses (HFSampler) -> score them (reward model or function) -> old/reference log-probs and
values -> per-token rewards (−β·KL, + the score at the last token) -> GAE advantages -> a few PPO epochs of
clipped policy + value loss over minibatches. The math is in align/rlhf/core.py. Written with accelerate:
`accelerate launch --config_file stages/accelerate/cpu2.yaml -m align.cli ppo stages/ppo.yaml` runs one
process per device, each with its own prompts, gradients averaged.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import DTYPE_HELP, Dtype, opt
from align.data.records import PromptRecord, read_prompts
from align.errors import ConfigError
from align.generation import SamplingSettings
from align.generation.select import BackendSettings
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.rlhf.core import KLEstimator


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
    whiten_advantages: bool = opt(True, "normalise advantages over the batch")


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
    progress: bool = opt(True, "show a progress bar")


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the policy to improve: an SFT run folder (adapter merged first) or a model")
    output_dir: str = opt("runs/ppo", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    seed: int = opt(42, "random seed", ge=0)
    dtype: Dtype = opt("float32", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    reward: RewardSettings = opt(RewardSettings(), "where the reward comes from")
    data: DataSettings = opt(DataSettings(), "prompts")
    sampling: SamplingSettings = opt(SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=48),
                                     "rollout sampling (top_p must be 1: PPO scores the distribution it samples)")
    peft: PeftSettings = opt(PeftSettings(dropout=0.0), "actor: lora | qlora | dora | full")
    ppo: PPOSettings = opt(PPOSettings(), "optimisation")
    kl: KLSettings = opt(KLSettings(), "KL penalty to the reference")
    shaping: ShapingSettings = opt(ShapingSettings(), "score shaping before it becomes the reward")
    critic: CriticSettings = opt(CriticSettings(), "value function")
    log: LogSettings = opt(LogSettings(), "logging and checkpoints")
    engine: BackendSettings = opt(BackendSettings(), "rollout sampler: hf (the trained model itself, or a copy "
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


def step_prompts(prompts: list[PromptRecord], step: int, rank: int, world: int, n: int, seed: int) -> list[PromptRecord]:
    """The `n` prompts of process `rank` at `step`: a fresh shuffle per pass over the data, a pure function of
    (step, rank) so a resumed run sees exactly the prompts the interrupted one would have."""
    out = []
    for i in range((step * world + rank) * n, (step * world + rank + 1) * n):
        epoch, j = divmod(i, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(prompts[order[j]])
    return out


def load_actor(cfg: Config) -> tuple[Any, Any, Any, Path, str]:
    """(policy with a fresh adapter, reference copy or None, tokenizer, policy folder, what is trained)."""
    from align.models.policy import load_policy

    p = load_policy(cfg.policy, stage="ppo", peft=cfg.peft, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                    total_steps=cfg.ppo.steps)
    return p.model, p.reference, p.tokenizer, p.source, p.trained


def load_critic(cfg: Config) -> Any:
    """None for a value head on the policy; else a reward-model copy with its own LoRA and a trainable head."""
    if cfg.critic.kind == "value_head":
        return None
    from align.models.load import load_model, resolve_model
    from align.models.peft import attach_peft

    critic = load_model(resolve_model(cfg.critic.model or cfg.reward.model), dtype=cfg.dtype, kind="classifier",
                        trust_remote_code=cfg.trust_remote_code)
    lora = dataclasses.replace(cfg.peft, method="lora") if cfg.peft.method != "dora" else cfg.peft
    return attach_peft(critic, lora, task_type="SEQ_CLS", extra_trainable=("score",))[0]


def run(cfg: Config) -> Path:
    import torch
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from align.generation.hf import HFSampler
    from align.generation.select import choose_backend
    from align.models.load import pick_dtype, resolve_model
    from align.models.peft import count_parameters
    from align.rewards import check_reward, load_reward
    from align.rlhf import checkpoint as ckpt
    from align.rlhf.core import (
        KLController,
        RunningMoments,
        explained_variance,
        gae,
        kl_penalty,
        logprobs_from_logits,
        masked_mean,
        policy_loss,
        shape_scores,
        token_rewards,
        value_loss,
        whiten,
    )
    from align.rlhf.policy import (
        ActorCritic,
        collate,
        load_trainable_state,
        reference_copy,
        reuse_first_pass,
        rollout_copy,
        score_rollout,
        sync_rollout_copy,
        trainable_state,
    )
    from align.runs import start_run

    # cpu=True without CUDA: under torchrun/accelerate launch that selects gloo DDP across CPU processes.
    acc = Accelerator(gradient_accumulation_steps=cfg.ppo.grad_accum, cpu=not torch.cuda.is_available())
    prompts = read_prompts(cfg.data.prompts)
    resolve_model(cfg.policy)  # bad inputs fail here, before the run folder exists
    check_reward(cfg.reward)
    if cfg.data.eval_size > 0:
        read_prompts(cfg.data.eval_prompts)
    run_ = start_run("ppo", cfg, resume=cfg.resume) if acc.is_main_process else None
    acc.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed + acc.process_index)

    # ---- models: actor (+ reference), critic, reward ----
    policy, reference, tokenizer, source, trained = load_actor(cfg)
    model = ActorCritic(policy, load_critic(cfg))
    model.eval()  # dropout stays off: PPO's ratio must compare the same deterministic network before and after
    reward_fn, reward_from = load_reward(cfg.reward)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.ppo.lr)
    model, optimizer = acc.prepare(model, optimizer)
    actor = acc.unwrap_model(model)
    if reference is not None:
        reference.to(acc.device)
    n_train, n_total = count_parameters(actor)
    acc.print(f"ppo: {trained} + {cfg.critic.kind}; training {n_train:,} of {n_total:,} parameters; "
              f"reward: {reward_from}; {acc.num_processes} process(es)")

    kl_ctl = KLController(cfg.kl.coef, cfg.kl.target or None, cfg.kl.horizon)
    moments = RunningMoments()
    start = 0
    last = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if last is not None:
        saved = ckpt.load_checkpoint(last, acc.process_index)
        load_trainable_state(actor, saved["trainable"], str(last))
        optimizer.load_state_dict(saved["optimizer"])
        kl_ctl = KLController(**saved["state"]["kl_controller"])
        moments = RunningMoments(**saved["state"]["reward_moments"])
        if saved["rng"] is not None:
            ckpt.set_rng_state(saved["rng"])
        start = saved["state"]["step"]
        acc.print(f"ppo: resumed from {last} (step {start} of {cfg.ppo.steps})")
    if acc.is_main_process:
        truncate_logs(run_dir, start)
    tb = SummaryWriter(str(run_dir / "tb")) if acc.is_main_process else None
    rollout_dir = run_dir / "rollout" / f"rank-{acc.process_index}"
    if choose_backend(cfg.engine.backend) == "vllm" and cfg.peft.method in ("lora", "full"):
        sampler: Any = rollout_engine(cfg, source, tokenizer, rollout_dir)
    else:  # sampled from the policy itself, or from a copy in a faster dtype (engine.dtype=auto on a CPU: bf16)
        clone = rollout_copy(actor.policy, cfg.peft.method, pick_dtype(cfg.engine.dtype, use="decode"))
        sampler = HFSampler(clone if clone is not None else actor.policy, tokenizer)
    # The reference pass in a faster dtype (kl.reference_dtype=auto on a CPU: bf16); the exact one stays for eval.
    fast_reference = reference_copy(actor.policy, reference, cfg.peft.method,
                                    pick_dtype(cfg.kl.reference_dtype, use="forward"))
    bar = tqdm(total=cfg.ppo.steps, initial=start, desc="ppo", disable=not (cfg.log.progress and acc.is_main_process))
    stats: dict[str, float] = {}

    for step in range(start, cfg.ppo.steps):
        done = step + 1
        # 1. rollouts
        t0 = time.perf_counter()
        batch_prompts = [r.prompt for r in step_prompts(prompts, step, acc.process_index, acc.num_processes,
                                                        cfg.ppo.batch_size, cfg.seed)]
        params = dataclasses.replace(cfg.sampling, seed=cfg.seed + 1000 * step + acc.process_index)
        if sampler.name == "vllm":
            sync_rollout_weights(sampler, actor.policy, cfg.peft.method, rollout_dir, step)
        elif sampler.model is not actor.policy:
            sync_rollout_copy(sampler.model, actor.policy, cfg.peft.method)
        samples = [group[0] for group in sampler.generate(batch_prompts, params, n=1)]
        # 2. scores
        t1 = time.perf_counter()
        scores = torch.tensor(reward_fn(batch_prompts, [s.text for s in samples]), dtype=torch.float32)
        t2 = time.perf_counter()
        truncated = torch.tensor([0.0 if s.finished else 1.0 for s in samples])
        all_scores = acc.gather(scores.to(acc.device)).cpu()
        # Every process updates the running moments with the same global batch, so they stay identical.
        moments.update(all_scores - cfg.shaping.missing_eos_penalty * acc.gather(truncated.to(acc.device)).cpu())
        shaped = shape_scores(scores, truncated, cfg.shaping.missing_eos_penalty, cfg.shaping.clip,
                              (moments.mean, moments.std) if cfg.shaping.normalize else None)

        # 3. old log-probs, values and reference log-probs under the sampling policy
        rollout = collate(samples, tokenizer.pad_token_id).to(acc.device)
        mask = rollout.response_mask
        # One minibatch and no dropout: the first training forward is also the old-policy pass (kept for step 5).
        first = (model(rollout.input_ids, rollout.attention_mask, rollout.position_ids, rollout.response_width)
                 if reuse_first_pass(model, len(samples), cfg.ppo.mini_batch_size, cfg.ppo.grad_accum) else None)
        old = score_rollout(actor, reference if fast_reference is None else fast_reference, rollout,
                            chunk=cfg.ppo.mini_batch_size,
                            temperature=cfg.sampling.temperature, first=first)
        t_logprobs = time.perf_counter()

        # 4. per-token rewards: −β·KL everywhere, plus the (shaped) score on the last response token
        kl = kl_penalty(old["logprobs"], old["ref_logprobs"], cfg.kl.estimator) * mask
        rewards = token_rewards(shaped.to(acc.device), kl, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old["values"], mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = whiten(advantages, mask)

        # 5. PPO epochs over shuffled minibatches
        losses: dict[str, list[float]] = {"loss/policy": [], "loss/value": [], "policy/clipfrac": [],
                                          "policy/approx_kl": []}
        order = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for epoch in range(cfg.ppo.epochs):
            for idx in torch.randperm(len(samples), generator=order).split(cfg.ppo.mini_batch_size):
                mb = rollout.rows(idx.to(acc.device))
                with acc.accumulate(model):
                    if epoch == 0 and first is not None:  # the whole rollout, reordered: rows of that forward
                        logits, values = first[0][idx.to(acc.device)], first[1][idx.to(acc.device)]
                    else:
                        logits, values = model(mb.input_ids, mb.attention_mask, mb.position_ids, mb.response_width)
                    logprobs = logprobs_from_logits(logits / cfg.sampling.temperature, mb.response_ids)
                    pg_loss, clipfrac = policy_loss(logprobs, old["logprobs"][idx], advantages[idx], mask[idx],
                                                    cfg.ppo.clip_range)
                    vf_loss = value_loss(values, old["values"][idx], returns[idx], mask[idx], cfg.ppo.value_clip_range)
                    acc.backward(pg_loss + cfg.ppo.vf_coef * vf_loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), cfg.ppo.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                approx_kl = masked_mean(kl_penalty(logprobs.detach(), old["logprobs"][idx], "k2"), mask[idx])
                for k, v in zip(losses, (pg_loss, vf_loss, clipfrac, approx_kl)):
                    losses[k].append(v.item())
        t3 = time.perf_counter()

        # 6. KL controller, metrics (averaged over processes), samples, checkpoint
        seq_kl = acc.gather((kl_penalty(old["logprobs"], old["ref_logprobs"], "k1") * mask).sum(-1)).mean()
        kl_ctl.update(float(seq_kl), len(all_scores))
        local = {k: sum(v) / len(v) for k, v in losses.items()} | {
            "entropy": float(masked_mean(old["entropy"], mask)),
            "value/explained_variance": float(explained_variance(old["values"], returns, mask)),
            "response/length": float(mask.sum(-1).mean()), "response/truncated": float(truncated.mean()),
            "reward/shaped_mean": float(shaped.mean()),
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/logprobs": t_logprobs - t2,
            "time/train": t3 - t_logprobs,
            **sampler_mismatch(samples, old["logprobs"], mask)}
        stats = {k: float(v) for k, v in zip(local, acc.reduce(torch.tensor(list(local.values()), device=acc.device),
                                                               "mean").tolist())}
        stats |= {"reward/mean": float(all_scores.mean()), "reward/std": float(all_scores.std(unbiased=False)),
                  "kl/ref": float(seq_kl), "kl/coef": kl_ctl.value, "step": done}
        if acc.is_main_process:
            log_step(run_dir, tb, done, stats)
            if done % cfg.log.sample_every == 0 or done == 1:
                log_samples(run_dir, tb, done, batch_prompts, samples, scores.tolist())
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl/ref']:.3f}")
        if done % cfg.log.save_every == 0 or done == cfg.ppo.steps:
            ckpt.save_checkpoint(
                run_dir, done, trainable=trainable_state(actor), optimizer=optimizer,
                state={"kl_controller": dataclasses.asdict(kl_ctl), "reward_moments": dataclasses.asdict(moments)},
                rank=acc.process_index, world=acc.num_processes, is_main=acc.is_main_process,
                barrier=acc.wait_for_everyone, keep=cfg.log.keep_checkpoints,
                save_policy=actor.policy.save_pretrained if cfg.peft.method != "full" else None)
    bar.close()

    if not acc.is_main_process:
        acc.wait_for_everyone()
        return run_dir
    assert run_ is not None
    if tb is not None:
        tb.close()
    finish(cfg, run_, actor, reference, tokenizer, source, reward_fn, stats)
    acc.wait_for_everyone()
    return run_.finish()


def rollout_engine(cfg: Config, source: Path, tokenizer: Any, folder: Path) -> Any:
    """A vLLM engine over the starting weights (an SFT adapter is merged into a plain folder first: vLLM's base
    must be one); the policy's updates reach it through `sync_rollout_weights`."""
    from align.generation.select import vllm_sampler
    from align.models.load import is_adapter, load_model

    base = source
    if is_adapter(source):
        base = folder / "base"
        if not (base / "config.json").is_file():
            load_model(source, dtype="float32", merge=True, trust_remote_code=cfg.trust_remote_code).save_pretrained(
                base, safe_serialization=True)
            tokenizer.save_pretrained(base)
    lora_rank = cfg.peft.r if cfg.peft.method == "lora" else None
    return vllm_sampler(base, tokenizer, cfg.engine, lora_rank=lora_rank, logprobs=True)


def sync_rollout_weights(sampler: Any, policy: Any, method: str, folder: Path, step: int) -> None:
    """Hand the current policy to the vLLM engine before a rollout: the LoRA adapter (without the value head) as a
    new LoRA request, or, for full fine-tuning, the weights reloaded in place. Only the newest copy is kept."""
    import shutil

    out = folder / f"step-{step}"
    if method == "full":
        policy.save_pretrained(out, safe_serialization=True)
        sampler.load_weights(out)
    else:
        policy.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
        sampler.set_adapter(out)
    for old in folder.glob("step-*"):
        if old != out:
            shutil.rmtree(old, ignore_errors=True)


def sampler_mismatch(samples: list[Any], logprobs: Any, mask: Any) -> dict[str, float]:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's (which PPO uses): mean and
    mean absolute difference per response token. {} when the sampler gives none (hf: they are the same model)."""
    import torch

    if not samples or samples[0].logprobs is None:
        return {}
    width = logprobs.shape[1]
    sampled = torch.tensor([s.logprobs + [0.0] * (width - len(s.logprobs)) for s in samples], device=logprobs.device)
    diff = (sampled - logprobs) * mask
    n = mask.sum().clamp(min=1)
    return {"sampler/logprob_diff": float(diff.sum() / n), "sampler/logprob_absdiff": float(diff.abs().sum() / n)}


def finish(cfg: Config, run_: Any, actor: Any, reference: Any, tokenizer: Any, source: Path, reward_fn: Any,
           stats: dict[str, float]) -> None:
    """Save the policy (and critic), run the held-out before/after check, fill the manifest."""
    from safetensors.torch import save_file

    from align.data.records import write_jsonl
    from align.models.policy import save_policy
    from align.rlhf.evaluate import evaluate_policy

    out = save_policy(actor.policy, tokenizer, run_.dir / "model", method=cfg.peft.method, base=source)
    run_.add_output("model", out)
    save_file(trainable_state_of_critic(actor), str(run_.dir / "critic.safetensors"))
    run_.add_output("critic", run_.dir / "critic.safetensors")
    run_.add_input(cfg.data.prompts)
    run_.add_input(source)
    run_.metrics.update({f"final/{k}": v for k, v in stats.items()})
    run_.metrics.update(first_step_metrics(run_.dir))
    if cfg.data.eval_size > 0:
        eval_prompts = [r.prompt for r in read_prompts(cfg.data.eval_prompts)[: cfg.data.eval_size]]
        metrics, rows = evaluate_policy(actor.policy, reference, tokenizer, eval_prompts,
                                        dataclasses.replace(cfg.sampling, seed=cfg.seed), reward_fn)
        write_jsonl(run_.dir / "eval_samples.jsonl", rows)
        run_.metrics.update(metrics)
        print(f"ppo: held-out reward {metrics['eval/reward_before']:.4f} -> {metrics['eval/reward_after']:.4f}, "
              f"KL to reference {metrics['eval/kl']:.4f}", flush=True)
    run_.extra["ppo"] = {"critic": cfg.critic.kind, "peft": cfg.peft.method, "policy_source": str(source)}


def trainable_state_of_critic(actor: Any) -> dict[str, Any]:
    module = actor.value_head if actor.critic is None else actor.critic
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def log_step(run_dir: Path, tb: Any, step: int, stats: dict[str, float]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(stats) + "\n")
    for k, v in stats.items():
        if k != "step":
            tb.add_scalar(k, v, step)
    tb.flush()


def log_samples(run_dir: Path, tb: Any, step: int, prompts: list, samples: list, scores: list[float]) -> None:
    rows = [{"step": step, "prompt": p[-1]["content"], "response": s.text, "score": sc, "finished": s.finished}
            for p, s, sc in zip(prompts, samples, scores)]
    with open(run_dir / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    text = "\n\n".join(f"**{r['prompt']}**  \n{r['response']}  \n*score {r['score']:.3f}*" for r in rows[:4])
    tb.add_text("samples", text, step)


def truncate_logs(run_dir: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be run again)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))


def first_step_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {"first/reward/mean": rows[0]["reward/mean"], "first/kl/ref": rows[0]["kl/ref"]} if rows else {}
