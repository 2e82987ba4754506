"""PPO: our own RLHF loop — LoRA actor, adapter-disabled reference, value head, KL-penalised reward, GAE.

One step: sample responses (HFSampler) -> score them (reward model or function) -> old/reference log-probs and
values -> per-token rewards (−β·KL, + the score at the last token) -> GAE advantages -> a few PPO epochs of
clipped policy + value loss over minibatches. The math is in align/rlhf/core.py. Written with accelerate:
`accelerate launch --config_file stages/accelerate/cpu2.yaml -m align.cli ppo stages/ppo.yaml` runs one
process per device, each with its own prompts; advantage whitening, loss normalisation and metrics are over every
process's tokens, so N processes x B/N prompts take the same step as 1 x B (tests/test_multiprocess.py).

`run` reads top to bottom: setup (+ resume) -> per step: collect_rollout -> compute_advantages -> ppo_update ->
step_metrics -> log_and_checkpoint -> finish.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align import runs
from align.config import DTYPE_HELP, Dtype, opt
from align.data.records import PromptRecord, read_prompts
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


@dataclass
class Trainer:
    """Everything a PPO step uses, built once by `setup` (and `resume`)."""

    acc: Any  # accelerate.Accelerator
    model: Any  # the prepared (DDP-wrapped) ActorCritic
    actor: Any  # the ActorCritic itself
    optimizer: Any
    reference: Any  # frozen start (full fine-tuning) or None (the adapter disabled)
    fast_reference: Any  # the reference in kl.reference_dtype, or None (the exact pass)
    tokenizer: Any
    source: Path
    sampler: Any
    reward_fn: Any
    prompts: list[PromptRecord]
    run_dir: Path
    run_: Any  # the Run on the main process, None elsewhere
    tb: Any
    bar: Any  # progress bar (disabled off the main process)
    kl_ctl: Any
    moments: Any
    start: int = 0
    tracker: Any = None  # MLflow / W&B (log.report_to), same metric names as metrics.jsonl; TensorBoard is `tb`

    @property
    def sum_over_processes(self) -> Any:
        """A Reduce for align.rlhf.core (None with one process: statistics stay exactly local)."""
        return None if self.acc.num_processes == 1 else lambda x: self.acc.reduce(x, "sum")

    @property
    def max_over_processes(self) -> Any:
        return None if self.acc.num_processes == 1 else lambda x: self.acc.reduce(x, "max")


@dataclass
class Batch:
    """One step's rollouts on this process. rollout: padded tensors [B, P + R]; sampler_logprobs: [B, R] or None."""

    prompts: list[Any]
    samples: list[Any]
    scores: Any  # [B] raw scores
    truncated: Any  # [B] 1.0 where cut at max_new_tokens
    shaped: Any  # [B] shaped scores
    all_scores: Any  # [world * B] every process's raw scores
    rollout: Any
    sampler_logprobs: Any
    times: dict[str, float]


@dataclass
class Advantages:
    """Old-policy numbers of a batch ([B, R] each) and the (logits, values) of the first training forward when it
    doubles as the old-policy pass (`reuse_first_pass`), else None."""

    old: dict[str, Any]
    kl: Any
    advantages: Any
    returns: Any
    weights: Any  # truncated importance-sampling weights (ppo.tis_cap), or None
    first: Any


def run(cfg: Config) -> Path:
    t = setup(cfg)
    stats: dict[str, float] = {}
    for step in range(t.start, cfg.ppo.steps):
        batch = collect_rollout(cfg, t, step)
        adv = compute_advantages(cfg, t, batch)
        losses = ppo_update(cfg, t, batch, adv, step)
        stats = step_metrics(cfg, t, batch, adv, losses, step + 1)
        stop = runs.stop_requested(sync=True)  # SIGTERM/Ctrl-C: every process stops after this same step
        log_and_checkpoint(cfg, t, batch, stats, step + 1, force_save=bool(stop))
        if stop:
            runs.interrupt_active_runs(f" after step {step + 1}")
    runs.at_step_boundaries(False)  # from here a signal stops at once
    t.bar.close()
    if not t.acc.is_main_process:
        # Nothing below is collective: the other processes end here instead of waiting at a barrier for the main
        # process's final save and evaluation (a failure there would leave them waiting forever).
        return t.run_dir
    return finish(cfg, t, stats)


def setup(cfg: Config) -> Trainer:
    """Inputs checked, the run folder started, models, optimizer, rollout sampler built, a checkpoint resumed."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from align.models.load import resolve_model
    from align.models.peft import count_parameters
    from align.rewards import check_reward, load_reward
    from align.rlhf.core import KLController, RunningMoments
    from align.rlhf.policy import ActorCritic
    from align.runs import start_run
    from align.tracking import Tracker

    # cpu=True without CUDA: under torchrun/accelerate launch that selects gloo DDP across CPU processes. Every
    # collective wait ends after collective_timeout, so a process that died does not leave the others waiting.
    acc = Accelerator(gradient_accumulation_steps=cfg.ppo.grad_accum, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    check_distributed(str(acc.distributed_type.value))
    prompts = read_prompts(cfg.data.prompts)
    resolve_model(cfg.policy)  # bad inputs fail here, before the run folder exists
    check_reward(cfg.reward)
    if cfg.data.eval_size > 0:
        read_prompts(cfg.data.eval_prompts)
    if cfg.resume:
        check_resume_world(cfg, acc.num_processes)
    run_ = start_run("ppo", cfg, resume=cfg.resume) if acc.is_main_process else None
    acc.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed + acc.process_index)

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
    t = Trainer(acc=acc, model=model, actor=actor, optimizer=optimizer, reference=reference,
                fast_reference=fast_reference(cfg, actor, reference), tokenizer=tokenizer, source=source,
                sampler=None, reward_fn=reward_fn, prompts=prompts, run_dir=run_dir, run_=run_, tb=None, bar=None,
                kl_ctl=KLController(cfg.kl.coef, cfg.kl.target or None, cfg.kl.horizon), moments=RunningMoments())
    resume(cfg, t)
    if acc.is_main_process:
        truncate_logs(run_dir, t.start)
        t.tb = SummaryWriter(str(run_dir / "tb"))
        t.tracker = Tracker.open(run_dir, cfg.log.report_to, tensorboard=False)
    runs.watch_stop_signals()  # on every process (start_run ran on the main one only)
    runs.at_step_boundaries(True)
    t.bar = tqdm(total=cfg.ppo.steps, initial=t.start, desc="ppo",
                 disable=not (cfg.log.progress and acc.is_main_process))
    # A vLLM engine takes engine.gpu_memory_utilization of the WHOLE GPU (and refuses to start when less is free):
    # with the policy already in memory, the trainer keeps the rest; engine.sleep frees the engine's share during
    # the update (`collect_rollout`).
    t.sampler = rollout_sampler(cfg, t)
    return t


def check_distributed(kind: str) -> None:
    """PPO's checkpoints and rollout-copy refresh read whole parameters and optimizer states on each process, which
    holds only shards under FSDP and DeepSpeed: refuse those instead of writing incomplete checkpoints."""
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"ppo runs on one process or under DDP (accelerate configs cpu2.yaml, ddp.yaml, "
                          f"multinode.yaml); this launch uses {kind}, which shards the parameters PPO saves and "
                          f"hands to its sampler. Launch it with --config_file stages/accelerate/ddp.yaml")


def check_resume_world(cfg: Config, world: int) -> None:
    """A checkpoint holds one RNG state per process and the prompts are split by process count: resuming with
    another count would silently change both, so it is refused, naming both numbers."""
    from align.rlhf import checkpoint as ckpt

    last = ckpt.latest_checkpoint(Path(cfg.output_dir))
    if last is None:
        return
    saved = json.loads((last / "state.json").read_text()).get("world_size", 1)
    if saved != world:
        raise ConfigError(f"{last} was written by {saved} process(es); this run has {world}: resume with "
                          f"{saved} processes (e.g. accelerate launch --num_processes {saved}), or start a new run")


def resume(cfg: Config, t: Trainer) -> None:
    """Load the newest checkpoint into the trainer when resume=true (t.start: its step)."""
    from align.rlhf import checkpoint as ckpt
    from align.rlhf.core import KLController, RunningMoments
    from align.rlhf.policy import load_trainable_state

    last = ckpt.latest_checkpoint(t.run_dir) if cfg.resume else None
    if last is None:
        return
    saved = ckpt.load_checkpoint(last, t.acc.process_index)
    load_trainable_state(t.actor, saved["trainable"], str(last))
    t.optimizer.load_state_dict(saved["optimizer"])
    t.kl_ctl = KLController(**saved["state"]["kl_controller"])
    t.moments = RunningMoments(**saved["state"]["reward_moments"])
    if saved["rng"] is not None:
        ckpt.set_rng_state(saved["rng"])
    t.start = saved["state"]["step"]
    t.acc.print(f"ppo: resumed from {last} (step {t.start} of {cfg.ppo.steps})")


def fast_reference(cfg: Config, actor: Any, reference: Any) -> Any:
    """The reference pass in a faster dtype (kl.reference_dtype=auto on a CPU: bf16), or None for the exact one."""
    from align.models.load import pick_dtype
    from align.rlhf.policy import reference_copy

    return reference_copy(actor.policy, reference, cfg.peft.method, pick_dtype(cfg.kl.reference_dtype, use="forward"))


def rollout_sampler(cfg: Config, t: Trainer) -> Any:
    """vLLM (handed every update), or hf: the policy itself, or a copy in a faster dtype (engine.dtype=auto on a
    CPU: bf16) refreshed before every rollout. Both report their log-probs of what they sampled."""
    from align.generation.hf import HFSampler
    from align.generation.select import choose_backend
    from align.models.load import pick_dtype
    from align.rlhf.policy import rollout_copy

    if choose_backend(cfg.engine.backend) == "vllm" and cfg.peft.method in ("lora", "full"):
        return rollout_engine(cfg, t.source, t.tokenizer, t.run_dir / "rollout" / f"rank-{t.acc.process_index}")
    clone = rollout_copy(t.actor.policy, cfg.peft.method, pick_dtype(cfg.engine.dtype, use="decode"))
    return HFSampler(clone if clone is not None else t.actor.policy, t.tokenizer, logprobs=True)


def collect_rollout(cfg: Config, t: Trainer, step: int) -> Batch:
    """This process's prompts of `step`, one response each from the current policy, their scores (shaped)."""
    import torch

    from align.rlhf.core import shape_scores
    from align.rlhf.policy import collate, sync_rollout_copy

    acc = t.acc
    t0 = time.perf_counter()
    prompts = [r.prompt for r in step_prompts(t.prompts, step, acc.process_index, acc.num_processes,
                                              cfg.ppo.batch_size, cfg.seed)]
    # One random stream per prompt, keyed by its place in the global batch: the same rollouts however the step's
    # prompts are split over processes (1 x 8 samples what 2 x 4 do).
    first = (step * acc.num_processes + acc.process_index) * cfg.ppo.batch_size
    seeds = [cfg.seed * 1_000_003 + first + i for i in range(len(prompts))]
    if t.sampler.name == "vllm":
        sync_rollout_weights(t.sampler, t.actor.policy, cfg.peft.method,
                             t.run_dir / "rollout" / f"rank-{acc.process_index}", step)
    elif t.sampler.model is not t.actor.policy:
        sync_rollout_copy(t.sampler.model, t.actor.policy, cfg.peft.method)
    samples = [group[0] for group in t.sampler.generate(prompts, cfg.sampling, n=1, seeds=seeds)]
    if t.sampler.name == "vllm" and cfg.engine.sleep:
        t.sampler.sleep()  # its memory back to the trainer until the next rollout
    t1 = time.perf_counter()
    scores = torch.tensor(t.reward_fn(prompts, [s.text for s in samples]), dtype=torch.float32)
    t2 = time.perf_counter()
    truncated = torch.tensor([0.0 if s.finished else 1.0 for s in samples])
    all_scores = acc.gather(scores.to(acc.device)).cpu()
    # Every process updates the running moments with the same global batch, so they stay identical.
    t.moments.update(all_scores - cfg.shaping.missing_eos_penalty * acc.gather(truncated.to(acc.device)).cpu())
    shaped = shape_scores(scores, truncated, cfg.shaping.missing_eos_penalty, cfg.shaping.clip,
                          (t.moments.mean, t.moments.std) if cfg.shaping.normalize else None)
    rollout = collate(samples, t.tokenizer.pad_token_id).to(acc.device)
    return Batch(prompts, samples, scores, truncated, shaped, all_scores, rollout,
                 sampler_logprobs(samples, rollout.response_width, acc.device),
                 {"time/generate": t1 - t0, "time/score": t2 - t1})


def compute_advantages(cfg: Config, t: Trainer, batch: Batch) -> Advantages:
    """Old log-probs, values and reference log-probs under the sampling policy -> per-token rewards (−β·KL
    everywhere, the shaped score on the last token) -> GAE, whitened over every process's tokens."""
    from align.rlhf.core import gae, kl_penalty, tis_weights, token_rewards, whiten
    from align.rlhf.policy import reuse_first_pass, score_rollout

    t0 = time.perf_counter()
    rollout, mask = batch.rollout, batch.rollout.response_mask
    # One minibatch and no dropout: the first training forward is also the old-policy pass (`ppo_update` reuses it).
    first = (t.model(rollout.input_ids, rollout.attention_mask, rollout.position_ids, rollout.response_width)
             if reuse_first_pass(t.model, len(batch.samples), cfg.ppo.mini_batch_size, cfg.ppo.grad_accum) else None)
    old = score_rollout(t.actor, t.reference if t.fast_reference is None else t.fast_reference, rollout,
                        chunk=cfg.ppo.mini_batch_size, temperature=cfg.sampling.temperature, first=first)
    kl = kl_penalty(old["logprobs"], old["ref_logprobs"], cfg.kl.estimator) * mask
    rewards = token_rewards(batch.shaped.to(t.acc.device), kl, mask, t.kl_ctl.value)
    advantages, returns = gae(rewards, old["values"], mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = whiten(advantages, mask, reduce=t.sum_over_processes)
    weights = None
    if cfg.ppo.tis_cap > 0 and batch.sampler_logprobs is not None:
        weights = tis_weights(old["logprobs"], batch.sampler_logprobs, cfg.ppo.tis_cap)
    batch.times["time/logprobs"] = time.perf_counter() - t0
    return Advantages(old, kl, advantages, returns, weights, first)


def ppo_update(cfg: Config, t: Trainer, batch: Batch, adv: Advantages, step: int) -> dict[str, list[float]]:
    """ppo.epochs passes of clipped policy + value loss over shuffled minibatches; per-minibatch loss numbers.

    Losses are token means over the GLOBAL minibatch (every process's tokens), so DDP's gradient average is the
    gradient of one process holding them all: 2 processes x 4 prompts take the step 1 x 8 takes.
    """
    import torch

    from align.rlhf.core import kl_penalty, logprobs_from_logits, policy_loss, token_mean, value_loss

    t0 = time.perf_counter()
    acc, rollout, mask, old = t.acc, batch.rollout, batch.rollout.response_mask, adv.old
    losses: dict[str, list[float]] = {"loss/policy": [], "loss/value": [], "policy/clipfrac": [],
                                      "policy/approx_kl": []}
    order = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for epoch in range(cfg.ppo.epochs):
        for idx in torch.randperm(len(batch.samples), generator=order).split(cfg.ppo.mini_batch_size):
            idx = idx.to(acc.device)
            mb = rollout.rows(idx)
            tokens = minibatch_tokens(t, mask[idx])
            with acc.accumulate(t.model):
                if epoch == 0 and adv.first is not None:  # the whole rollout, reordered: rows of that forward
                    logits, values = adv.first[0][idx], adv.first[1][idx]
                else:
                    logits, values = t.model(mb.input_ids, mb.attention_mask, mb.position_ids, mb.response_width)
                logprobs = logprobs_from_logits(logits / cfg.sampling.temperature, mb.response_ids)
                pg_loss, clipfrac = policy_loss(logprobs, old["logprobs"][idx], adv.advantages[idx], mask[idx],
                                                cfg.ppo.clip_range, adv.weights[idx] if adv.weights is not None
                                                else None, tokens)
                vf_loss = value_loss(values, old["values"][idx], adv.returns[idx], mask[idx],
                                     cfg.ppo.value_clip_range, tokens)
                acc.backward(pg_loss + cfg.ppo.vf_coef * vf_loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(t.model.parameters(), cfg.ppo.max_grad_norm)
                t.optimizer.step()
                t.optimizer.zero_grad()
            approx_kl = token_mean(kl_penalty(logprobs.detach(), old["logprobs"][idx], "k2"), mask[idx], tokens)
            for k, v in zip(losses, (pg_loss, vf_loss, clipfrac, approx_kl)):
                losses[k].append(v.item())
    batch.times["time/train"] = time.perf_counter() - t0
    return losses


def minibatch_tokens(t: Trainer, mask: Any) -> Any:
    """The divisor that makes a process's token sum its share of the global minibatch's token mean (see
    align.rlhf.core.token_mean): every process's tokens / processes. None with one process (the plain mean)."""
    reduce = t.sum_over_processes
    if reduce is None:
        return None
    return reduce(mask.sum().float()).clamp(min=1.0) / t.acc.num_processes


def step_metrics(cfg: Config, t: Trainer, batch: Batch, adv: Advantages, losses: dict[str, list[float]],
                 done: int) -> dict[str, float]:
    """Update the KL controller; the step's metrics, each over every process's rollouts (identical everywhere)."""
    import torch

    from align.rlhf.core import explained_variance, kl_penalty, logprob_mismatch, masked_mean

    acc, mask, old, reduce = t.acc, batch.rollout.response_mask, adv.old, t.sum_over_processes
    seq_kl = acc.gather((kl_penalty(old["logprobs"], old["ref_logprobs"], "k1") * mask).sum(-1)).mean()
    t.kl_ctl.update(float(seq_kl), len(batch.all_scores))
    # Every process has the same number of rows and minibatches: a plain mean over processes of these is global
    # (the losses are already shares of the global token mean, see `ppo_update`).
    per_process = {k: sum(v) / len(v) for k, v in losses.items()} | {
        "response/length": float(mask.sum(-1).mean()), "response/truncated": float(batch.truncated.mean()),
        "reward/shaped_mean": float(batch.shaped.mean()), **batch.times}
    averaged = acc.reduce(torch.tensor(list(per_process.values()), device=acc.device), "mean").tolist()
    stats = dict(zip(per_process, averaged))
    stats |= {"entropy": float(masked_mean(old["entropy"], mask, reduce=reduce)),
              "value/explained_variance": float(explained_variance(old["values"], adv.returns, mask, reduce))}
    if batch.sampler_logprobs is not None:
        gap = logprob_mismatch(batch.sampler_logprobs, old["logprobs"], mask, reduce, t.max_over_processes)
        stats |= {f"sampler/{k}": float(v) for k, v in gap.items()}
    stats |= {"reward/mean": float(batch.all_scores.mean()), "reward/std": float(batch.all_scores.std(unbiased=False)),
              "kl/ref": float(seq_kl), "kl/coef": t.kl_ctl.value, "step": done}
    return {k: float(v) for k, v in stats.items()}


def log_and_checkpoint(cfg: Config, t: Trainer, batch: Batch, stats: dict[str, float], done: int,
                       force_save: bool = False) -> None:
    """metrics.jsonl / TensorBoard / trackers / samples (main process), and every save_every steps (or when
    `force_save`: a stop signal) a checkpoint (all)."""
    from align.rlhf import checkpoint as ckpt
    from align.rlhf.policy import trainable_state

    if t.acc.is_main_process:
        log_step(t.run_dir, t.tb, done, stats)
        t.tracker.log(stats, done)
        if done % cfg.log.sample_every == 0 or done == 1:
            log_samples(t.run_dir, t.tb, done, batch.prompts, batch.samples, batch.scores.tolist())
    t.bar.update(1)
    t.bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl/ref']:.3f}")
    if force_save or done % cfg.log.save_every == 0 or done == cfg.ppo.steps:
        ckpt.save_checkpoint(
            t.run_dir, done, trainable=trainable_state(t.actor), optimizer=t.optimizer,
            state={"kl_controller": dataclasses.asdict(t.kl_ctl), "reward_moments": dataclasses.asdict(t.moments)},
            rank=t.acc.process_index, world=t.acc.num_processes, is_main=t.acc.is_main_process,
            barrier=t.acc.wait_for_everyone, keep=cfg.log.keep_checkpoints,
            save_policy=t.actor.policy.save_pretrained if cfg.peft.method != "full" else None)


def rollout_engine(cfg: Config, source: Path, tokenizer: Any, folder: Path) -> Any:
    """A vLLM engine over the starting weights, told its dtype (engine.dtype; auto: bf16 on a GPU that has it). PPO
    trains a fresh adapter on the merged start, so a start that is an adapter (or a stacked chain of them) is merged
    into one plain folder first, in float32, and saved in the served dtype (`merged_model`); the policy's updates
    reach the engine through `sync_rollout_weights`."""
    from align.generation.select import merged_model, serve_dtype, vllm_sampler
    from align.models.load import is_adapter

    dtype = serve_dtype(cfg.engine.dtype, None if is_adapter(source) else source)
    base = merged_model(source, dtype, cfg.trust_remote_code) if is_adapter(source) else source
    lora_rank = cfg.peft.r if cfg.peft.method == "lora" else None
    return vllm_sampler(base, tokenizer, dataclasses.replace(cfg.engine, dtype=dtype), lora_rank=lora_rank,
                        logprobs=True)


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


def sampler_logprobs(samples: list[Any], width: int, device: Any) -> Any:
    """The sampler's log-probs of the sampled tokens as [B, width] (0 on padding), or None when it gave none."""
    import torch

    if not samples or any(s.logprobs is None for s in samples):
        return None
    return torch.tensor([s.logprobs + [0.0] * (width - len(s.logprobs)) for s in samples], device=device)


def finish(cfg: Config, t: Trainer, stats: dict[str, float]) -> Path:
    """Main process: save the policy (and critic), run the held-out before/after check, fill the manifest."""
    from safetensors.torch import save_file

    from align.data.records import write_jsonl
    from align.models.policy import save_policy
    from align.rlhf.evaluate import evaluate_policy

    run_, actor = t.run_, t.actor
    if t.tb is not None:
        t.tb.close()
        t.tracker.close()
    release_sampler(t)
    out = save_policy(actor.policy, t.tokenizer, run_.dir / "model", method=cfg.peft.method, base=t.source)
    run_.add_output("model", out)
    save_file(trainable_state_of_critic(actor), str(run_.dir / "critic.safetensors"))
    run_.add_output("critic", run_.dir / "critic.safetensors")
    run_.add_input(cfg.data.prompts)
    run_.add_input(t.source)
    run_.metrics.update({f"final/{k}": v for k, v in stats.items()})
    run_.metrics.update(first_step_metrics(run_.dir))
    if cfg.data.eval_size > 0:
        eval_prompts = [r.prompt for r in read_prompts(cfg.data.eval_prompts)[: cfg.data.eval_size]]
        metrics, rows = evaluate_policy(actor.policy, t.reference, t.tokenizer, eval_prompts,
                                        dataclasses.replace(cfg.sampling, seed=cfg.seed), t.reward_fn)
        write_jsonl(run_.dir / "eval_samples.jsonl", rows)
        run_.metrics.update(metrics)
        print(f"ppo: held-out reward {metrics['eval/reward_before']:.4f} -> {metrics['eval/reward_after']:.4f}, "
              f"KL to reference {metrics['eval/kl']:.4f}", flush=True)
    run_.extra["ppo"] = {"critic": cfg.critic.kind, "peft": cfg.peft.method, "policy_source": str(t.source),
                         "processes": t.acc.num_processes, "tis_cap": cfg.ppo.tis_cap}
    return run_.finish()


def release_sampler(t: Trainer) -> None:
    """Record what the rollout engine was given (memory share, sleep mode, served dtype) and shut it down."""
    describe = getattr(t.sampler, "describe", None)
    if describe is not None and t.run_ is not None:
        t.run_.extra["engine"] = describe()
    close = getattr(t.sampler, "close", None)
    if close is not None:
        close()
    t.sampler = None


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
