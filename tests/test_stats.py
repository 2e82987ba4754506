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


# ---------------------------------------------------------------- intervals over prompts and seeds

def test_crossed_bootstrap_sees_both_factors_of_an_additive_table() -> None:
    import numpy as np

    from align.stats import bootstrap_win_rate

    # y[t, p] = a_t + b_p with a = (0.2, 0.4), b = (0.1, 0.3, 0.1, 0.3): population variances 0.01 and 0.01.
    # A replicate's mean is mean(a*) + mean(b*), two independent resampled means, so its variance is
    # 0.01 / 2 + 0.01 / 4 = 0.0075 (SE 0.0866). Resampling prompts alone would give 0.01 / 4 (SE 0.05).
    a, b = np.array([0.2, 0.4]), np.array([0.1, 0.3, 0.1, 0.3])
    table = a[:, None] + b[None, :]
    iv = bootstrap_win_rate(table, n_boot=20000)
    assert iv.mean == pytest.approx(0.5) and iv.per_seed == pytest.approx([0.4, 0.6]) and iv.n == 8
    from align.stats import _weighted_means, crossed_bootstrap_weights

    reps = _weighted_means(table[:, None, :], crossed_bootstrap_weights((2, 1, 4), 20000))
    assert reps.std() == pytest.approx(math.sqrt(0.0075), rel=0.03)
    assert iv.low < 0.5 - 1.5 * 0.05 and iv.high > 0.5 + 1.5 * 0.05  # wider than a prompts-only interval


def test_seed_to_seed_swings_widen_the_interval_that_wilson_misses() -> None:
    from align.stats import bootstrap_win_rate

    # Seeds 0 and 2 win every prompt, seed 1 loses every one: 100 of 150 comparisons won. Resampling the 3 seeds,
    # the share of seed-1 draws k/3 has P(k=3) = 1/27 = 3.7% > 2.5% and P(k=0) = 8/27: the 95% interval is [0, 1].
    table = [[1.0] * 50, [0.0] * 50, [1.0] * 50]
    iv = bootstrap_win_rate(table, n_boot=4000)
    assert iv.mean == pytest.approx(2 / 3) and iv.per_seed == [1.0, 0.0, 1.0]
    assert (iv.low, iv.high) == (0.0, 1.0)
    low, high = wilson_interval(100, 150)
    assert high - low < 0.16  # counting cells as independent would claim ±8 points


def test_abstains_are_left_out_and_shapes_are_checked() -> None:
    from align.stats import as_table, bootstrap_win_rate

    nan = math.nan
    iv = bootstrap_win_rate([[[1.0, 0.0, nan, 0.5]]], n_boot=200)
    assert iv.mean == pytest.approx(0.5) and iv.n == 3
    with pytest.raises(ValueError, match="training seeds"):
        as_table([1.0, 0.0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        as_table([[2.0]])


def test_paired_difference_finds_what_unpaired_intervals_cannot() -> None:
    import numpy as np

    from align.stats import bootstrap_win_rate, paired_difference

    # B wins every other prompt; A is B plus a win on 10 of the 50 prompts B lost: A - B = +0.1 on every seed.
    b = np.tile(np.array([1.0, 0.0] * 50), (3, 2, 1))  # [3 seeds, 2 sampling seeds, 100 prompts]
    a = b.copy()
    a[:, :, 1:21:2] = 1.0
    d = paired_difference(a, b, n_boot=4000)
    assert d["diff"] == pytest.approx(0.1) and d["per_seed"] == pytest.approx([0.1] * 3)
    assert 0.0 < d["low"] <= 0.1 <= d["high"] and d["p_value"] < 0.01
    ia, ib = bootstrap_win_rate(a, n_boot=4000), bootstrap_win_rate(b, n_boot=4000)
    assert ia.low < ib.high  # on their own, the two intervals overlap
    # no difference: a zero-width interval and p = 1; the sign follows the order of the arguments
    same = paired_difference(b, b, n_boot=500)
    assert (same["diff"], same["low"], same["high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert paired_difference(b, a, n_boot=500)["diff"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:2], n_boot=10)


def test_bootstrap_lc_win_rate_matches_the_point_fit() -> None:
    from align.stats import bootstrap_lc_win_rate, length_controlled_win_rate

    # the hand-computed table of the LC test above, as one seed: σ(ln 3 / 2) = 0.6340
    outcomes = ["win", "win", "win", "loss", "win", "win", "loss", "loss"]
    y = [[[{"win": 1.0, "loss": 0.0}[o] for o in outcomes]]]
    delta = [[[10] * 4 + [-10] * 4]]
    iv = bootstrap_lc_win_rate(y, delta, n_boot=500)
    point = length_controlled_win_rate(outcomes, [20] * 4 + [0] * 4, [10] * 8)["rate"]
    assert iv.mean == pytest.approx(point, abs=1e-6) == pytest.approx(1 / (1 + 3 ** -0.5), abs=1e-4)
    assert iv.low < iv.mean < iv.high and iv.per_seed == pytest.approx([point], abs=1e-6)
