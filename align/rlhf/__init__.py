"""RL for language models: pure tensor math (core), the actor-critic module and rollout tensors (policy),
resumable PPO checkpoints (checkpoint), the held-out reward/KL check shared by PPO and DPO (evaluate)."""

from align.rlhf.core import (
    KLController,
    RunningMoments,
    entropy,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
    whiten,
)

__all__ = ["KLController", "RunningMoments", "entropy", "explained_variance", "gae", "kl_penalty",
           "logprobs_from_logits", "masked_mean", "masked_var", "policy_loss", "value_loss", "whiten"]
