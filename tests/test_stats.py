"""Win rates and Wilson intervals against numbers computed by hand."""

from __future__ import annotations

import math

import pytest

from align.stats import count_outcomes, score_outcome, wilson_interval, win_rate


def test_wilson_8_of_10_matches_hand_computation() -> None:
    # z = 1.96: p = 0.8, z²/n = 0.38416; centre = (0.8 + 0.19208) / 1.38416 = 0.716738
    # half = 1.96 / 1.38416 * sqrt(0.8 * 0.2 / 10 + 3.8416 / 400) = 1.416021 * 0.160012 = 0.226581
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.716738 - 0.226581, abs=1e-5)
    assert high == pytest.approx(0.716738 + 0.226581, abs=1e-5)


def test_wilson_extremes_stay_inside_zero_one() -> None:
    # 0 of 10: centre = half = 0.19208 / 1.38416 = 0.138770, so (0, 0.277540)
    low, high = wilson_interval(0, 10, z=1.96)
    assert low == 0.0 and high == pytest.approx(0.277540, abs=1e-5)
    low, high = wilson_interval(10, 10, z=1.96)
    assert low == pytest.approx(1 - 0.277540, abs=1e-5) and high <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_half_and_drops_abstains() -> None:
    wr = win_rate(wins=6, losses=2, ties=2, abstains=5)
    assert wr.n == 10 and wr.abstains == 5
    assert wr.rate == pytest.approx(0.7)
    low, high = wilson_interval(7, 10)
    assert (wr.low, wr.high) == (low, high)
    # a 30/50 rate is not significantly above one half, 40/50 is
    assert win_rate(30, 20).low < 0.5 < win_rate(40, 10).low
    assert win_rate(0, 0, 0, 3).rate == 0.5 and win_rate(0, 0, 0, 3).to_json()["n"] == 0


def test_count_outcomes_and_score_outcome() -> None:
    wr = count_outcomes(["win", "win", "loss", "tie", "abstain"])
    assert (wr.wins, wr.losses, wr.ties, wr.abstains) == (2, 1, 1, 1)
    assert wr.rate == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        count_outcomes(["draw"])  # type: ignore[list-item]
    assert score_outcome(0.9, 0.5) == "win"
    assert score_outcome(0.5, 0.9) == "loss"
    assert score_outcome(0.5, 0.55, tie_margin=0.1) == "tie"
    assert score_outcome(None, 0.5) == "abstain"
    assert score_outcome(math.nan, 0.5) == "abstain"


def test_length_controlled_win_rate_equals_the_hand_computed_fit() -> None:
    from align.stats import length_controlled_win_rate

    # Δ = ±10 tokens, so Δ/s = ±1 and x = ±tanh(1). Longer answers: 3 wins, 1 loss; shorter: 2 wins, 2 losses.
    # Two groups, two parameters: the fit is exact, logit p(+) = θ + φ·c and logit p(-) = θ - φ·c, so
    # θ = (logit 0.75 + logit 0.5) / 2 = ln(3) / 2 and the length-controlled rate is σ(ln 3 / 2) = 0.6340.
    outcomes = ["win", "win", "win", "loss", "win", "win", "loss", "loss", "abstain"]
    policy = [20] * 4 + [0] * 4 + [99]
    base = [10] * 8 + [0]
    lc = length_controlled_win_rate(outcomes, policy, base)
    theta = math.log(3) / 2
    assert lc["rate"] == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-4)
    assert lc["length_coef"] == pytest.approx(theta / math.tanh(1), abs=1e-3) and not lc["flag"]
    # a policy that wins only when it writes more: raw 50%, but at equal length it would lose; it is flagged
    outcomes = ["win"] * 6 + ["loss"] * 2 + ["loss"] * 6 + ["win"] * 2
    lc = length_controlled_win_rate(outcomes, [30] * 8 + [10] * 8, [20] * 16)
    assert lc["rate"] == pytest.approx(0.5, abs=1e-4)  # symmetric: θ = (logit 0.75 + logit 0.25) / 2 = 0
    lc = length_controlled_win_rate(["win"] * 6 + ["tie"] * 2, [30] * 6 + [20] * 2, [20] * 8)
    assert lc["rate"] < 0.75 and lc["flag"]  # raw 87.5%; all its wins came with longer answers
    assert length_controlled_win_rate(["abstain"], [1], [1]) is None
