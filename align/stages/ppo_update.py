"""PPO's update of one rollout batch: old-policy numbers and GAE advantages (`compute_advantages`), the clipped
policy + value loss over minibatches (`ppo_update`), and the step's metrics over every process (`step_metrics`).
The math itself is in align/rlhf/core.py."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from align.stages.ppo_config import Config
from align.stages.ppo_rollout import Batch, Trainer


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
    # FSDP: every forward goes through the root wrapper, which gathers the parameters (the unwrapped module's
    # would see shards); elsewhere the unwrapped ActorCritic, as DDP needs no hooks for a no-grad pass.
    forward = t.model if t.sharding.startswith("fsdp") else t.actor
    old = score_rollout(forward, t.reference if t.fast_reference is None else t.fast_reference, rollout,
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
