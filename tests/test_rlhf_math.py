"""The RL math in align/rlhf/core.py against numbers computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.rlhf import (
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


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list | float, tol: float = 1e-5) -> None:
    assert torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=tol), (actual, expected)


def test_logprobs_from_logits():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([ln 2, ln 2]) = [1/2, 1/2]
    logits = t([[[0.0, math.log(3)], [math.log(2), math.log(2)]]])
    close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    close(logprobs_from_logits(logits, torch.tensor([[0, 1]])), [[math.log(0.25), math.log(0.5)]])


def test_logprobs_are_float32_for_bf16_logits():
    logits = t([[[0.0, 1.0, 2.0]]]).bfloat16()
    assert logprobs_from_logits(logits, torch.tensor([[2]])).dtype == torch.float32


X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # valid values: 1, 2, 4


def test_masked_mean():
    close(masked_mean(t(X), t(M)), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(t(X), t(M), dim=1), [1.5, 4.0])


def test_masked_var():
    # mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9 = 14/3
    close(masked_var(t(X), t(M), unbiased=False), 14 / 9)
    close(masked_var(t(X), t(M), unbiased=True), 7 / 3)  # 14/3 / (3 - 1)


def test_whiten():
    # valid values 1, 3: mean 2, (biased) std 1; the masked 100 becomes 0
    close(whiten(t([[1.0, 3.0, 100.0]]), t([[1, 1, 0]])), [[-1.0, 1.0, 0.0]])
    close(whiten(t([[1.0, 3.0, 100.0]]), t([[1, 1, 0]]), shift_mean=False), [[1.0, 3.0, 0.0]])
    close(whiten(t([[2.0, 6.0]]), t([[1, 1]])), [[-1.0, 1.0]])  # mean 4, std 2


def test_entropy():
    # uniform over 4: ln 4; [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4)
    close(entropy(t([[[0.0, 0.0, 0.0, 0.0]]])), [[math.log(4)]])
    close(entropy(t([[[0.0, math.log(3)]]])), [[0.25 * math.log(4) + 0.75 * math.log(4 / 3)]])


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, 9.0]]), t([[1, 1, 1, 0]])
    close(explained_variance(t([[1.0, 2.0, 3.0, 0.0]]), returns, mask), 1.0)  # perfect critic
    close(explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)  # constant = the mean
    # residuals 0, 0, -1: biased var 2/9; var(returns) = 2/3  ->  1 - (2/9)/(2/3) = 2/3
    close(explained_variance(t([[1.0, 2.0, 4.0, 0.0]]), returns, mask), 2 / 3)
    assert math.isnan(explained_variance(t([[0.0, 0.0]]), t([[5.0, 5.0]]), t([[1, 1]])))


def test_kl_penalty():
    lp, ref = t([[0.0, -1.0, -2.0]]), t([[-1.0, 0.0, -2.0]])  # lp - ref = 1, -1, 0
    close(kl_penalty(lp, ref, "k1"), [[1.0, -1.0, 0.0]])
    close(kl_penalty(lp, ref, "k2"), [[0.5, 0.5, 0.0]])  # ½(±1)²
    # e^(ref-lp) - 1 - (ref-lp):  e^-1 - 1 + 1 = 0.367879;  e^1 - 1 - 1 = 0.718282
    close(kl_penalty(lp, ref, "k3"), [[math.exp(-1), math.e - 2, 0.0]])
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalty(lp, ref, "k4")  # type: ignore[arg-type]


def test_gae_monte_carlo_when_lambda_is_one():
    # γ = λ = 1, V = 0.5: A_t = (sum of future rewards) - V_t = 1 - 0.5; returns = 1
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.5]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_lambda_half():
    # δ = [0, 0, 0.5];  A2 = 0.5, A1 = 0 + 0.5·0.5 = 0.25, A0 = 0.5·0.25 = 0.125;  R = A + V
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])


def test_gae_stops_at_the_last_valid_token():
    # mask [1, 1, 0], γ = 0.9, λ = 0.8; the padded position (reward 5, value 7) must not leak back.
    # t=1 (last valid): δ = 1 + 0 - 2 = -1, A1 = -1
    # t=0: δ = 0 + 0.9·2 - 1 = 0.8, A0 = 0.8 + 0.72·(-1) = 0.08;  returns = [1.08, 1.0, 0]
    adv, ret = gae(t([[0.0, 1.0, 5.0]]), t([[1.0, 2.0, 7.0]]), t([[1, 1, 0]]), gamma=0.9, lam=0.8)
    close(adv, [[0.08, -1.0, 0.0]])
    close(ret, [[1.08, 1.0, 0.0]])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=6))
def test_gae_with_zero_values_is_reward_to_go(rewards):
    r = t([rewards])
    adv, ret = gae(r, torch.zeros_like(r), torch.ones_like(r), gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
    assert torch.allclose(adv, to_go, atol=1e-4) and torch.allclose(ret, to_go, atol=1e-4)


def test_policy_loss():
    # ε = 0.2, old log-prob -1 everywhere; ratios r = 1.5, 0.5, 0.5, 1, (2, masked)
    #   r=1.5, A=1:  max(-1.5, -1.2) = -1.2   clipped
    #   r=0.5, A=1:  max(-0.5, -0.8) = -0.5
    #   r=0.5, A=-2: max(1.0, 1.6)   = 1.6    clipped
    #   r=1,   A=3:  max(-3, -3)     = -3
    # loss = (-1.2 - 0.5 + 1.6 - 3) / 4 = -0.775; clipfrac = 2/4
    ratios = t([[1.5, 0.5, 0.5, 1.0, 2.0]])
    old = torch.full_like(ratios, -1.0)
    loss, clipfrac = policy_loss(old + torch.log(ratios), old, t([[1.0, 1.0, -2.0, 3.0, 10.0]]),
                                 t([[1, 1, 1, 1, 0]]), clip_range=0.2)
    close(loss, -0.775)
    close(clipfrac, 0.5)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    lp = t([[-0.3, -2.0]])
    loss, clipfrac = policy_loss(lp, lp.clone(), t([[2.0, -1.0]]), t([[1, 1]]), clip_range=0.2)
    close(loss, -0.5)  # -(2 - 1) / 2
    close(clipfrac, 0.0)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    lp = torch.log(t([[1.5, 0.5]])).requires_grad_()
    loss, _ = policy_loss(lp, torch.zeros(1, 2), t([[1.0, 1.0]]), t([[1, 1]]), clip_range=0.2)
    loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlp of -(A·e^lp)/2 = -0.5·0.5
    close(lp.grad, [[0.0, -0.25]])


def test_value_loss():
    # ε = 0.2
    #   v=1.0, v_old=0.5, R=1: clip -> 0.7;  max(0, 0.09) = 0.09
    #   v=0.0, v_old=0.1, R=1: clip -> 0.0;  max(1, 1)    = 1
    #   v=2.0, v_old=1.0, R=0: clip -> 1.2;  max(4, 1.44) = 4
    #   fourth token masked
    # loss = ½ · (0.09 + 1 + 4) / 3 = 0.848333
    loss = value_loss(t([[1.0, 0.0, 2.0, 50.0]]), t([[0.5, 0.1, 1.0, 0.0]]), t([[1.0, 1.0, 0.0, 0.0]]),
                      t([[1, 1, 1, 0]]), clip_range=0.2)
    close(loss, 0.5 * 5.09 / 3)


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(value=0.1)
    assert fixed.update(100.0, 64) == 0.1
    adaptive = KLController(value=0.1, target=6.0, horizon=10000)
    # KL 12: error clip(12/6 - 1) = +0.2 -> β · (1 + 0.2·100/10000) = 0.1 · 1.002
    assert adaptive.update(12.0, 100) == pytest.approx(0.1002)
    # KL 3: error -0.5 clipped to -0.2 -> · 0.998
    assert adaptive.update(3.0, 100) == pytest.approx(0.1002 * 0.998)
    # KL 6.6: error 0.1 -> · 1.001
    assert adaptive.update(6.6, 100) == pytest.approx(0.1002 * 0.998 * 1.001)
    assert adaptive.update(float("nan"), 100) == pytest.approx(0.1002 * 0.998 * 1.001)


def test_running_moments():
    m = RunningMoments()
    m.update(t([1.0, 2.0, 3.0]))
    assert (m.mean, m.var, m.count) == (pytest.approx(2.0), pytest.approx(2 / 3), 3)
    m.update(t([4.0, 5.0]))  # all of 1..5: mean 3, variance 2
    assert (m.mean, m.var, m.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    assert m.std == pytest.approx(math.sqrt(2))


def test_token_rewards_put_the_score_on_the_last_token_and_minus_beta_kl_everywhere() -> None:
    from align.rlhf.core import token_rewards

    kl = torch.tensor([[0.2, -0.1, 0.4], [0.3, 0.5, 0.0]])  # already zero past each response's end
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    # row 0: -0.5*[0.2, -0.1, 0.4] + [0, 0, 2]; row 1 ends at token 1: -0.5*[0.3, 0.5, 0] + [0, -1, 0]
    assert torch.allclose(out, torch.tensor([[-0.1, 0.05, 1.8], [-0.15, -1.25, 0.0]]))


def test_shape_scores_penalise_cut_answers_then_normalise_then_clip() -> None:
    from align.rlhf.core import shape_scores

    scores, cut = torch.tensor([1.0, 3.0, -4.0]), torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(shape_scores(scores, cut, 0.5, 0.0), torch.tensor([1.0, 2.5, -4.0]))
    # (x - 1) / 2 with the running moments (mean 1, std 2), then clipped to [-1, 1]
    assert torch.allclose(shape_scores(scores, cut, 0.5, 1.0, (1.0, 2.0)), torch.tensor([0.0, 0.75, -1.0]))


def test_length_residuals_by_hand() -> None:
    """lengths 1, 2, 3 with scores 1, 3, 2: mean length 2, mean score 2, cov 1/3, var 2/3 -> slope 1/2, so the
    scores become 1 + 1/2, 3, 2 - 1/2: the mean kept, no covariance with length left."""
    from align.rlhf.core import length_residuals

    lengths, scores = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    out = length_residuals(scores, lengths, scores, lengths)
    assert out.tolist() == [1.5, 3.0, 1.5]
    assert float(((lengths - 2) * (out - out.mean())).sum()) == 0.0 and float(out.mean()) == 2.0
    # One process's share of the batch: the trend fitted over every process's rollouts, subtracted from its own.
    assert length_residuals(scores[2:], lengths[2:], scores, lengths).tolist() == [1.5]
    # A pure length reward becomes a constant; equal lengths leave the scores as they are.
    assert length_residuals(3 * lengths, lengths, 3 * lengths, lengths).tolist() == [6.0, 6.0, 6.0]
    same = torch.tensor([4.0, 4.0, 4.0])
    assert length_residuals(scores, same, scores, same).tolist() == scores.tolist()
