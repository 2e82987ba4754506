"""Judge report: is this judge good enough to train on? Compare its verdicts with human labels on the same pairs.

Pure functions over `Row`s (one per human-labelled pair the judge was asked about):

- agreement: the share of the judge's decisive verdicts (a or b) that match the human choice;
- Cohen's kappa: that agreement corrected for chance, (p_o - p_e) / (1 - p_e), where p_e is the agreement
  expected from the judge's and the humans' a/b rates alone (Cohen 1960); 0 is chance level, 1 is perfect;
- position bias: the share of decisive single-order readings won by the response shown first (0.5 is none);
- length bias: on decisive pairs of unequal length, how often the judge picked the longer response versus how
  often the humans did on the same pairs (a judge that favours length shows a positive difference);
- abstain, tie and failure rates.

A rate with nothing to count is None (shown as n/a), never a misleading 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DECISIVE = ("a", "b")


@dataclass(frozen=True)
class Row:
    """One human-labelled pair as the judge saw it.

    verdict: the judge's final call, "a" | "b" | "tie" | "abstain" | "failed".
    human: the response the humans chose, "a" | "b".
    len_a, len_b: the responses' lengths (characters).
    picks: the judge's pick ("a" | "b" | "tie") in each presentation it made (a Verdict's `orders`).
    shown_first: for each presentation, which response ("a" | "b") was shown first.
    """

    verdict: str
    human: str
    len_a: int
    len_b: int
    picks: tuple[str, ...] = ()
    shown_first: tuple[str, ...] = ()


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def decisive(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.verdict in DECISIVE]


def agreement(rows: list[Row]) -> float | None:
    """Share of decisive judge verdicts equal to the human label."""
    d = decisive(rows)
    return ratio(sum(r.verdict == r.human for r in d), len(d))


def cohen_kappa(rows: list[Row]) -> float | None:
    """Cohen's kappa between judge and humans on the decisive rows (labels a/b); None when chance agreement
    is already 1 (both always said the same letter) or there are no decisive rows."""
    d = decisive(rows)
    if not d:
        return None
    observed = sum(r.verdict == r.human for r in d) / len(d)
    judge_a = sum(r.verdict == "a" for r in d) / len(d)
    human_a = sum(r.human == "a" for r in d) / len(d)
    expected = judge_a * human_a + (1 - judge_a) * (1 - human_a)
    return (observed - expected) / (1 - expected) if expected < 1 else None


def position_bias(rows: list[Row]) -> tuple[float | None, int]:
    """(share of decisive readings won by the response shown first, number of decisive readings). Failed
    rows are left out; score judges have no readings."""
    readings = [(pick, first) for r in rows if r.verdict != "failed"
                for pick, first in zip(r.picks, r.shown_first) if pick in DECISIVE]
    return ratio(sum(pick == first for pick, first in readings), len(readings)), len(readings)


def length_bias(rows: list[Row]) -> dict[str, Any]:
    """How often the longer response wins, by the judge and by the humans, on the same pairs: decisive judge
    verdicts where the two responses differ in length."""
    pairs = [r for r in decisive(rows) if r.len_a != r.len_b]
    longer = ["a" if r.len_a > r.len_b else "b" for r in pairs]
    judge = ratio(sum(r.verdict == side for r, side in zip(pairs, longer)), len(pairs))
    human = ratio(sum(r.human == side for r, side in zip(pairs, longer)), len(pairs))
    return {"length_pairs": len(pairs), "judge_longer_wins": judge, "human_longer_wins": human,
            "length_bias": None if judge is None or human is None else judge - human}


def judge_report(rows: list[Row]) -> dict[str, Any]:
    """Every number of the report as a JSON-able dict (None where there is nothing to count)."""
    n = len(rows)
    failed = sum(r.verdict == "failed" for r in rows)
    answered = n - failed
    abstains = sum(r.verdict == "abstain" for r in rows)
    ties = sum(r.verdict == "tie" for r in rows)
    n_decisive = len(decisive(rows))
    first_wins, readings = position_bias(rows)
    return {"pairs": n, "decisive": n_decisive, "coverage": ratio(n_decisive, n),
            "agreement": agreement(rows), "cohen_kappa": cohen_kappa(rows),
            "position_first_wins": first_wins, "position_readings": readings, **length_bias(rows),
            "abstains": abstains, "abstain_rate": ratio(abstains, answered), "ties": ties,
            "tie_rate": ratio(ties, answered), "failures": failed, "failure_rate": ratio(failed, n)}


def format_report(report: dict[str, Any]) -> str:
    """One line for the log: agreement, kappa, position and length bias, abstains and failures."""
    def pct(key: str) -> str:
        value = report.get(key)
        return "n/a" if value is None else f"{value:.0%}"

    kappa = report.get("cohen_kappa")
    return (f"judge vs humans on {report['pairs']} pairs: agreement {pct('agreement')} on {report['decisive']} "
            f"decisive, kappa {'n/a' if kappa is None else f'{kappa:.2f}'}, first shown wins "
            f"{pct('position_first_wins')}, longer wins {pct('judge_longer_wins')} (humans "
            f"{pct('human_longer_wins')}), abstains {pct('abstain_rate')}, failures {pct('failure_rate')}")
