"""Win rates with a 95% confidence interval (Wilson score interval).

Conventions (used by `align eval` and the report):
- A comparison of policy A against a baseline B has one of four outcomes: win, loss, tie, abstain.
- **Ties count half**: win rate = (wins + ties / 2) / (wins + losses + ties). Ties are also reported on their own.
- **Abstains** (the judge could not decide, or failed) are left out of the denominator and reported separately,
  so a judge that abstains a lot shows up as a small `n`, not as a fake 50%.
- The interval is Wilson's score interval on that rate with n = wins + losses + ties (a tie contributes half a
  success). Wilson behaves well near 0 and 1 and for small n, where the normal approximation does not.
- Over several training and sampling seeds (`make quality`), `bootstrap_win_rate`, `bootstrap_lc_win_rate` and
  `paired_difference` resample prompts, sampling seeds and training seeds together (see the section below), so an
  interval also holds the seed-to-seed spread that one run's Wilson interval cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Outcome = Literal["win", "loss", "tie", "abstain"]
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional, e.g. half ties).

    Returns (low, high) in [0, 1]; (0, 1) when n == 0 (nothing is known).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """Counts of outcomes and the win rate (ties half, abstains excluded) with its 95% Wilson interval."""

    wins: int
    losses: int
    ties: int
    abstains: int
    rate: float  # (wins + ties/2) / n; 0.5 when n == 0
    low: float
    high: float

    @property
    def n(self) -> int:
        """Decided comparisons (wins + losses + ties): the denominator of `rate`."""
        return self.wins + self.losses + self.ties

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


def win_rate(wins: int, losses: int, ties: int = 0, abstains: int = 0) -> WinRate:
    """Win rate with ties counted half and abstains left out, plus the 95% Wilson interval."""
    n = wins + losses + ties
    successes = wins + ties / 2
    low, high = wilson_interval(successes, n)
    return WinRate(wins=wins, losses=losses, ties=ties, abstains=abstains,
                   rate=successes / n if n else 0.5, low=low, high=high)


def count_outcomes(outcomes: Iterable[Outcome]) -> WinRate:
    """Tally a sequence of 'win' / 'loss' / 'tie' / 'abstain' into a WinRate."""
    counts = {"win": 0, "loss": 0, "tie": 0, "abstain": 0}
    for o in outcomes:
        if o not in counts:
            raise ValueError(f"unknown outcome {o!r}; expected one of {', '.join(counts)}")
        counts[o] += 1
    return win_rate(counts["win"], counts["loss"], counts["tie"], counts["abstain"])


def score_outcome(policy: float | None, baseline: float | None, tie_margin: float = 0.0) -> Outcome:
    """Outcome of a score judge: higher score wins; |difference| <= tie_margin is a tie; a missing score abstains."""
    if policy is None or baseline is None or math.isnan(policy) or math.isnan(baseline):
        return "abstain"
    if abs(policy - baseline) <= tie_margin:
        return "tie"
    return "win" if policy > baseline else "loss"


LENGTH_FLAG = 0.10  # |raw - length-controlled| above this: the policy wins (or loses) by its length


def length_controlled_win_rate(outcomes: list[Outcome], policy_lengths: list[float],
                               baseline_lengths: list[float], ridge: float = 1e-6) -> dict[str, Any] | None:
    """The win rate the policy would have if its answers were as long as the baseline's (AlpacaEval 2's
    length-controlled win rate, without its per-instruction term; Dubois et al. 2024, arXiv:2404.04475).

    Fit P(win) = σ(θ + φ·tanh(Δ/s)) by maximum likelihood on the decided comparisons (ties as y = 0.5, abstains
    left out), where Δ = policy length - baseline length and s = the standard deviation of Δ; the
    length-controlled win rate is σ(θ), the prediction at Δ = 0. `ridge` (on φ only) keeps a perfectly
    length-separated table finite. Returns {rate, length_coef, flag} or None when nothing was decided.
    """
    y_of = {"win": 1.0, "loss": 0.0, "tie": 0.5}
    rows = [(y_of[o], p - b) for o, p, b in zip(outcomes, policy_lengths, baseline_lengths) if o in y_of]
    if not rows:
        return None
    ys = [y for y, _ in rows]
    xs = length_features([d for _, d in rows])
    theta, phi = (float(v[0]) for v in lc_fit(ys, xs, [[1.0] * len(ys)], ridge))
    rate = 1 / (1 + math.exp(-theta))
    raw = sum(ys) / len(ys)
    return {"rate": rate, "length_coef": phi, "flag": abs(raw - rate) > LENGTH_FLAG}


def length_features(deltas: list[float]) -> list[float]:
    """tanh(Δ / s) with s the (population) standard deviation of the Δs: the regressor of the LC fit."""
    mean_ = sum(deltas) / len(deltas)
    s = math.sqrt(sum((d - mean_) ** 2 for d in deltas) / len(deltas)) or 1.0
    return [math.tanh(d / s) for d in deltas]


def lc_fit(ys: Any, xs: Any, weights: Any, ridge: float = 1e-6) -> tuple[Any, Any]:
    """Weighted maximum-likelihood fit of P(y) = σ(θ + φ·x), one fit per row of `weights`, by Newton-Raphson.

    ys, xs: [N]; weights: [B, N] (how often each comparison counts; a bootstrap replicate is one row).
    `ridge` penalises φ only. Returns (θ [B], φ [B]); where x does not vary, φ stays 0 and θ alone is fitted.
    """
    import numpy as np

    y, x = np.asarray(ys, dtype=float), np.asarray(xs, dtype=float)
    w = np.asarray(weights, dtype=float)
    theta, phi = np.zeros(len(w)), np.zeros(len(w))
    for _ in range(100):
        p = 1 / (1 + np.exp(-(theta[:, None] + phi[:, None] * x)))
        r, v = w * (y - p), w * p * (1 - p)
        g0, g1 = r.sum(1), (r * x).sum(1) - ridge * phi
        h00, h01, h11 = v.sum(1), (v * x).sum(1), (v * x * x).sum(1) + ridge
        det = h00 * h11 - h01 * h01
        flat = det <= 1e-12  # every Δ the same (or nothing weighed): length cannot explain anything
        safe = np.where(flat, 1.0, det)
        step0 = np.where(flat, np.where(h00 > 1e-12, g0 / np.maximum(h00, 1e-12), 0.0), (h11 * g0 - h01 * g1) / safe)
        step1 = np.where(flat, 0.0, (h00 * g1 - h01 * g0) / safe)
        theta, phi = theta + step0, phi + step1
        if float(np.max(np.abs(step0) + np.abs(step1))) < 1e-10:
            break
    return theta, phi


# ---------------------------------------------------------------- intervals over prompts and seeds
#
# A quality table holds one policy's outcomes against the baseline as y[t, s, p]: training seed t (the whole
# pipeline trained again), sampling seed s (the evaluation sampled again), held-out prompt p; 1 win, ½ tie, 0 loss,
# NaN abstain. Its mean win rate is the mean over decided cells. The interval resamples the three factors
# independently with replacement (the "pigeonhole" bootstrap for crossed factors, Owen 2007, Ann. Appl. Stat.
# 1(2):386-411): a cell counts as often as its training seed, sampling seed and prompt were drawn, so the interval
# contains prompt-to-prompt AND seed-to-seed variation. Two policies evaluated on the same prompts with the same
# seeds are compared with the same draws (paired), which cancels what they share. With 3 training seeds the
# bootstrap sees the seed spread through 3 values only: read the per-seed values next to the interval.

OUTCOME_VALUE: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0, "abstain": math.nan}


@dataclass(frozen=True)
class Interval:
    """A mean with its percentile-bootstrap interval and the mean of each training seed."""

    mean: float
    low: float
    high: float
    per_seed: list[float]
    n: int  # decided cells

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def crossed_bootstrap_weights(shape: tuple[int, ...], n_boot: int, seed: int = 0) -> Any:
    """[n_boot, *shape] weights: for each replicate and each axis, how often each index was drawn (n draws with
    replacement out of n), multiplied over the axes — a cell counts as often as all its indices were drawn."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = np.ones((n_boot, *shape))
    for axis, n in enumerate(shape):
        counts = rng.multinomial(n, [1.0 / n] * n, size=n_boot).astype(float)  # [n_boot, n]
        view = [n_boot] + [1] * len(shape)
        view[axis + 1] = n
        w = w * counts.reshape(view)
    return w


def as_table(table: Any) -> Any:
    """A [training seeds, sampling seeds, prompts] float array (a 2-D table is one sampling seed per training seed)."""
    import numpy as np

    y = np.asarray(table, dtype=float)
    if y.ndim == 2:
        y = y[:, None, :]
    if y.ndim != 3 or 0 in y.shape:
        raise ValueError(f"a quality table is [training seeds, sampling seeds, prompts]; got shape {y.shape}")
    finite = y[~np.isnan(y)]
    if ((finite < 0) | (finite > 1)).any():
        raise ValueError("outcome values must lie in [0, 1] (1 win, 0.5 tie, 0 loss) or be NaN (abstain)")
    return y


def _weighted_means(y: Any, w: Any) -> Any:
    """Mean of the decided cells of y under each replicate's weights: [B] (NaN where nothing decided was drawn)."""
    import numpy as np

    decided = ~np.isnan(y)
    num = (w * np.where(decided, y, 0.0)).reshape(len(w), -1).sum(1)
    den = (w * decided).reshape(len(w), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _percentiles(values: Any, level: float) -> tuple[float, float]:
    import numpy as np

    alpha = (1 - level) / 2
    if np.isnan(values).all():  # no replicate drew a decided cell: nothing is known
        return math.nan, math.nan
    low, high = np.nanpercentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def _point(y: Any) -> float:
    import numpy as np

    return float(np.nanmean(y)) if (~np.isnan(y)).any() else math.nan


def bootstrap_win_rate(table: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean win rate of a [training seeds, sampling seeds, prompts] table (module comment above) with its
    crossed-bootstrap interval and the per-training-seed means."""
    import numpy as np

    y = as_table(table)
    reps = _weighted_means(y, crossed_bootstrap_weights(y.shape, n_boot, seed))
    low, high = _percentiles(reps, level)
    return Interval(mean=_point(y), low=low, high=high, per_seed=[_point(y[t]) for t in range(len(y))],
                    n=int((~np.isnan(y)).sum()))


def paired_difference(table_a: Any, table_b: Any, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Does policy A's win rate differ from B's? Both tables are on the same cells (same training seeds, sampling
    seeds and prompts); each replicate draws ONE set of weights for both, so what the cells share cancels.

    Returns {diff (A - B), low, high, p_value, per_seed}; p_value is the two-sided bootstrap p-value
    2·min(P*(diff ≤ 0), P*(diff ≥ 0)), capped at 1.
    """
    import numpy as np

    a, b = as_table(table_a), as_table(table_b)
    if a.shape != b.shape:
        raise ValueError(f"paired tables must have the same shape; got {a.shape} and {b.shape}")
    w = crossed_bootstrap_weights(a.shape, n_boot, seed)
    reps = _weighted_means(a, w) - _weighted_means(b, w)
    low, high = _percentiles(reps, level)
    reps = reps[~np.isnan(reps)]
    p = min(1.0, 2 * min(float((reps <= 0).mean()), float((reps >= 0).mean()))) if len(reps) else 1.0
    return {"diff": _point(a) - _point(b), "low": low, "high": high, "p_value": p,
            "per_seed": [_point(a[t]) - _point(b[t]) for t in range(len(a))]}


def bootstrap_lc_win_rate(table: Any, length_delta: Any, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95, ridge: float = 1e-6) -> Interval:
    """The length-controlled win rate (see `length_controlled_win_rate`) of a quality table, with the same
    crossed-bootstrap interval. length_delta[t, s, p]: policy length - baseline length of that cell.

    s (the scale of Δ) is taken once from the whole table; each replicate refits θ with its weights."""
    import numpy as np

    y, d = as_table(table), np.asarray(length_delta, dtype=float).reshape(as_table(table).shape)
    decided = ~np.isnan(y)
    if not decided.any():
        return Interval(math.nan, math.nan, math.nan, [math.nan] * len(y), 0)
    ys, xs = y[decided], np.asarray(length_features(list(d[decided])))
    w = crossed_bootstrap_weights(y.shape, n_boot, seed)[:, decided]  # [B, N decided]
    theta, _ = lc_fit(ys, xs, np.vstack([np.ones((1, len(ys))), w]), ridge)
    rates = 1 / (1 + np.exp(-theta))
    low, high = _percentiles(rates[1:], level)
    per_seed = []
    for t in range(len(y)):
        mask = decided[t]
        if not mask.any():
            per_seed.append(math.nan)
            continue
        th, _ = lc_fit(y[t][mask], length_features(list(d[t][mask])), [[1.0] * int(mask.sum())], ridge)
        per_seed.append(float(1 / (1 + np.exp(-th[0]))))
    return Interval(mean=float(rates[0]), low=low, high=high, per_seed=per_seed, n=int(decided.sum()))
