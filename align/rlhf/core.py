"""The RL math of PPO as small pure functions on `[batch, T]` tensors with a response mask.

Conventions: `mask` is 1.0 on response tokens and 0.0 on padding, a contiguous prefix of each row (responses
are right-padded). "Mean over mask" is the token-level mean over every valid token of the batch. Each function
is checked against numbers computed by hand in tests/test_rlhf_math.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
# Sums a tensor over every process (an all-reduce) and returns the total on each; None: this process alone.
# With it, a statistic "over the batch" is over the GLOBAL batch, so 2 processes x 4 rows compute what 1 x 8 does.
Reduce = Callable[[Tensor], Tensor]


def reduce_sum(x: Tensor, reduce: Reduce | None) -> Tensor:
    """`x` summed over the processes (`x` itself without a reduce op)."""
    return x if reduce is None else reduce(x)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under softmax(logits), computed in float32.

    logits: [B, T, V]; tokens: [B, T] -> [B, T]
    """
    # cross_entropy = -(z_token - logsumexp(z)) in one fused kernel whose backward is softmax - onehot: on a CPU
    # about 1.8x faster forward + backward than gather - logsumexp over a 49k vocabulary.
    flat = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), tokens.flatten(), reduction="none")
    return -flat.view(tokens.shape)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, reduce: Reduce | None = None) -> Tensor:
    """Mean of `x` over positions where mask == 1 (all of them, or along `dim`). x, mask: [B, T].

    reduce: the sum and the count are summed over processes first (one collective): the global mean.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        total = reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]), reduce)
        return total[0] / total[1].clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected when `unbiased`). x, mask: [B, T] -> scalar.
    reduce: over the positions of every process (two collectives: the mean, then the squared deviations)."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        n = reduce_sum(mask.to(x.dtype).sum(), reduce)
        if n < 2:
            raise ValueError("masked_var needs at least two valid positions for an unbiased variance")
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Reduce | None = None) -> Tensor:
    """(x - mean) / std over the masked positions; zero outside the mask. x, mask: [B, T] -> [B, T].

    With `shift_mean=False` the mean is kept (only the scale changes), as done for rewards. With `reduce`, mean and
    std are those of every process's positions together (PPO's advantages over the global batch).
    """
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, unbiased=False, reduce=reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position. logits: [B, T, V] -> [B, T]."""
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """-Σ p·log p from log-probabilities [..., V] (when they are at hand: no second pass over the vocabulary)."""
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the mask: 1 is a perfect critic, 0 a constant one.

    values, returns, mask: [B, T] -> scalar (nan when the returns do not vary). reduce: over every process.
    """
    var_returns = masked_var(returns, mask, unbiased=False, reduce=reduce)
    var_residual = masked_var(returns - values, mask, unbiased=False, reduce=reduce)  # every process calls both
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1 - var_residual / var_returns


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimator) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3).

    k1 = lp - ref (unbiased, can be negative); k2 = ½(lp - ref)²; k3 = e^(ref-lp) - 1 - (ref - lp) (unbiased, >= 0).
    logprobs, ref_logprobs: [B, T] -> [B, T]
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def length_residuals(scores: Tensor, lengths: Tensor, all_scores: Tensor, all_lengths: Tensor) -> Tensor:
    """Scores [B] minus their linear trend in response length: score − b·(length − mean length), with the
    least-squares slope b = cov(length, score) / var(length) and the mean fitted over the global batch (all_scores,
    all_lengths [N]: every process's, so every process subtracts the same trend); b = 0 when every length is equal.
    Within the batch the scores then neither favour longer nor shorter answers, and their mean is unchanged: the
    length control of LC win rates (Dubois et al. 2024, arXiv:2404.04475) applied to PPO's reward, so a reward
    model's taste for short (or long) answers does not become the policy's."""
    x, y = all_lengths.double(), all_scores.double()
    var = (x - x.mean()).square().mean()
    slope = ((x - x.mean()) * (y - y.mean())).mean() / var if var > 0 else torch.zeros((), dtype=torch.float64)
    return (scores.double() - slope * (lengths.double() - x.mean())).to(scores.dtype)


def shape_scores(scores: Tensor, truncated: Tensor, missing_eos_penalty: float, clip: float,
                 moments: tuple[float, float] | None = None) -> Tensor:
    """Scores [B] -> shaped scores [B]: minus `missing_eos_penalty` where the response was cut (truncated = 1.0),
    then standardised by `moments` = (mean, std) if given, then clipped to [-clip, clip] (clip 0: off)."""
    shaped = scores - missing_eos_penalty * truncated
    if moments is not None:
        shaped = (shaped - moments[0]) / moments[1]
    return shaped.clamp(-clip, clip) if clip > 0 else shaped


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO's per-token rewards: −β·KL at every response token, plus the sequence's score on its last token.

    scores: [B]; kl, mask: [B, T] (kl already zero outside mask) -> [B, T]
    """
    rewards = -beta * kl
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(scores.shape[0], device=scores.device), last] += scores
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, backwards over the response tokens.

    δ_t = r_t + γ·V_{t+1} - V_t;  A_t = δ_t + γλ·A_{t+1}; the value (and advantage) after the last valid token
    is 0, so an episode ends there. Returns (advantages, returns = advantages + values), both zero outside mask.
    rewards, values, mask: [B, T] -> ([B, T], [B, T])
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        # A padded position t+1 means the episode ended at t: nothing flows back from beyond it.
        valid_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * next_value * valid_next - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_advantage * valid_next
        next_value, next_advantage = values[:, t], advantages[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_mean(x: Tensor, mask: Tensor, tokens: Tensor | float | None = None) -> Tensor:
    """Σ x·mask / tokens: the masked mean when `tokens` is None (this batch's own count), else a sum scaled by a
    count given from outside. PPO passes (tokens of the global minibatch) / (processes): DDP then averages the
    processes' gradients into exactly the gradient of the global token mean, however the tokens are split."""
    if tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / tokens


def tis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"; verl's tis_imp_ratio_cap, TRL's vllm_importance_sampling_cap): the tokens were drawn by the sampler
    (another dtype or engine), not by the trainer's old policy, so each token's loss is weighted by
    min(π_old / π_sampler, cap). No gradient flows through the weight. [B, T] -> [B, T]"""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, weights: Tensor | None = None,
                tokens: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate: mean over mask of w·max(-A·r, -A·clip(r, 1-ε, 1+ε)), r = exp(lp - lp_old).

    weights: per-token w (`tis_weights`; None: 1). tokens: the count the mean divides by (`token_mean`).
    Returns (loss, clipfrac): clipfrac is the fraction of tokens where the clipped term was the larger one.
    logprobs, old_logprobs, advantages, mask: [B, T] -> (scalar, scalar)
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = token_mean(per_token, mask, tokens)
    clipfrac = token_mean((clipped > unclipped).float(), mask, tokens)
    return loss, clipfrac


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float,
               tokens: Tensor | float | None = None) -> Tensor:
    """Clipped value loss: ½ · mean over mask of max((v - R)², (clip(v, v_old - ε, v_old + ε) - R)²).

    values, old_values, returns, mask: [B, T] -> scalar (tokens: as in `token_mean`)
    """
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    return 0.5 * token_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, tokens)


def logprob_mismatch(sampler_logprobs: Tensor, logprobs: Tensor, mask: Tensor,
                     reduce: Reduce | None = None, max_reduce: Reduce | None = None) -> dict[str, Tensor]:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's: mean Δ, mean |Δ| and max |Δ|
    per response token, Δ = sampler − trainer (reduce / max_reduce: sum / max over processes). [B, T] -> scalars"""
    diff = (sampler_logprobs - logprobs) * mask.to(logprobs.dtype)
    biggest = diff.abs().max() if diff.numel() else torch.zeros((), device=diff.device)
    return {"logprob_diff": masked_mean(diff, mask, reduce=reduce),
            "logprob_absdiff": masked_mean(diff.abs(), mask, reduce=reduce),
            "logprob_maxdiff": biggest if max_reduce is None else max_reduce(biggest)}


@dataclass
class KLController:
    """The KL coefficient β: fixed (target=None), or adapted towards a target KL (Ziegler et al. 2019).

    Adaptive rule: e = clip(KL / target - 1, -0.2, 0.2); β ← β · (1 + e · n / horizon), n = samples this step.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target and math.isfinite(current_kl):
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


@dataclass
class RunningMoments:
    """Running mean and variance of every reward seen so far (for reward normalisation across steps)."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, x: Tensor) -> None:
        """Merge a batch of values (any shape) into the running moments (Chan et al.'s parallel formula)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = (self.var * self.count if self.count else 0.0) + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0
