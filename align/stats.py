"""Win rates with a 95% confidence interval (Wilson score interval).

Conventions (used by `align eval` and the report):
- A comparison of policy A against a baseline B has one of four outcomes: win, loss, tie, abstain.
- **Ties count half**: win rate = (wins + ties / 2) / (wins + losses + ties). Ties are also reported on their own.
- **Abstains** (the judge could not decide, or failed) are left out of the denominator and reported separately,
  so a judge that abstains a lot shows up as a small `n`, not as a fake 50%.
- The interval is Wilson's score interval on that rate with n = wins + losses + ties (a tie contributes half a
  success). Wilson behaves well near 0 and 1 and for small n, where the normal approximation does not.
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
    deltas = [d for _, d in rows]
    mean = sum(deltas) / len(deltas)
    s = math.sqrt(sum((d - mean) ** 2 for d in deltas) / len(deltas)) or 1.0
    xs = [math.tanh(d / s) for d in deltas]
    ys = [y for y, _ in rows]
    theta = phi = 0.0
    for _ in range(100):  # Newton-Raphson on the 2-parameter log-likelihood
        g0 = g1 = h00 = h01 = h11 = 0.0
        for x, y in zip(xs, ys):
            p = 1 / (1 + math.exp(-(theta + phi * x)))
            w = p * (1 - p)
            g0, g1 = g0 + (y - p), g1 + (y - p) * x
            h00, h01, h11 = h00 + w, h01 + w * x, h11 + w * x * x
        g1 -= ridge * phi
        h11 += ridge
        det = h00 * h11 - h01 * h01
        if det <= 1e-12:  # every Δ the same: length cannot explain anything, θ alone
            step0, step1 = (g0 / h00 if h00 > 1e-12 else 0.0), 0.0
        else:
            step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        theta, phi = theta + step0, phi + step1
        if abs(step0) + abs(step1) < 1e-10:
            break
    rate = 1 / (1 + math.exp(-theta))
    raw = sum(ys) / len(ys)
    return {"rate": rate, "length_coef": phi, "flag": abs(raw - rate) > LENGTH_FLAG}
