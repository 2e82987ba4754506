"""Held-out check of a trained policy: reward before (reference) and after (policy), and KL to the reference."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from align.data.records import Message
from align.generation import Sample, SamplingSettings
from align.generation.hf import HFSampler
from align.rewards import RewardFn
from align.rlhf.core import logprobs_from_logits
from align.rlhf.policy import collate, model_device, reference_policy, response_logits


def _sample_and_score(model: nn.Module, tokenizer: Any, prompts: list[list[Message]], sampling: SamplingSettings,
                      reward_fn: RewardFn) -> tuple[list[Sample], list[float]]:
    samples = [group[0] for group in HFSampler(model, tokenizer).generate(prompts, sampling, n=1)]
    return samples, reward_fn(prompts, [s.text for s in samples])


@torch.no_grad()
def sequence_kl(policy: nn.Module, reference: nn.Module | None, samples: list[Sample], pad_id: int,
                chunk: int = 8) -> list[float]:
    """Monte-Carlo KL(policy || reference) of each sample: Σ_t (log π(y_t) - log π_ref(y_t)) over its tokens."""
    out: list[float] = []
    device = model_device(policy)
    for start in range(0, len(samples), chunk):
        batch = collate(samples[start:start + chunk], pad_id).to(device)
        lp = logprobs_from_logits(response_logits(policy, batch), batch.response_ids)
        with reference_policy(policy, reference) as ref:
            ref_lp = logprobs_from_logits(response_logits(ref, batch), batch.response_ids)
        out += ((lp - ref_lp) * batch.response_mask).sum(-1).tolist()
    return out


def evaluate_policy(policy: nn.Module, reference: nn.Module | None, tokenizer: Any, prompts: list[list[Message]],
                    sampling: SamplingSettings, reward_fn: RewardFn) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample the reference and the policy on the same prompts with the same seed and score both.

    Returns (metrics, rows): eval/reward_before, eval/reward_after (+ std), eval/kl (mean sequence KL of the
    policy's samples to the reference), eval/length_* and eval/truncated_* (share cut at max_new_tokens);
    rows pair each prompt's two responses.
    """
    was_training = policy.training
    policy.eval()
    with reference_policy(policy, reference) as ref:
        before, before_scores = _sample_and_score(ref, tokenizer, prompts, sampling, reward_fn)
    after, after_scores = _sample_and_score(policy, tokenizer, prompts, sampling, reward_fn)
    kl = sequence_kl(policy, reference, after, tokenizer.pad_token_id)
    policy.train(was_training)
    metrics = {
        "eval/reward_before": statistics.fmean(before_scores), "eval/reward_after": statistics.fmean(after_scores),
        "eval/reward_std_before": statistics.pstdev(before_scores),
        "eval/reward_std_after": statistics.pstdev(after_scores),
        "eval/kl": statistics.fmean(kl), "eval/prompts": float(len(prompts)),
        "eval/length_before": statistics.fmean(len(s.response_ids) for s in before),
        "eval/length_after": statistics.fmean(len(s.response_ids) for s in after),
        "eval/truncated_before": statistics.fmean(not s.finished for s in before),
        "eval/truncated_after": statistics.fmean(not s.finished for s in after),
    }
    rows = [{"prompt": p, "before": b.text, "reward_before": rb, "after": a.text, "reward_after": ra, "kl": k}
            for p, b, rb, a, ra, k in zip(prompts, before, before_scores, after, after_scores, kl)]
    return metrics, rows
