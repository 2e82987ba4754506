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
