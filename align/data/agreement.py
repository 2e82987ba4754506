"""Aggregating several annotators' labels of one response pair, and inter-annotator agreement.

A *unit* is one (prompt, unordered response pair); its labels are 'a', 'b' or 'tie' in one fixed orientation.
Agreement is computed over units with two or more labels:
- raw agreement: agreeing label pairs / all label pairs within units (pooled over units);
- Krippendorff's alpha for nominal data: 1 - (n - 1) * D_o / D_e from the coincidence matrix;
- Cohen's kappa: only when exactly two named annotators labelled the units, over the units both labelled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import permutations

AGGREGATES = ("majority", "unanimous", "all")


def aggregate_label(labels: Sequence[str], rule: str) -> tuple[str | None, str]:
    """Decide one unit: returns (winner 'a'|'b', '') or (None, reason) with reason tie|no_majority|not_unanimous.

    majority: the label with a strict plurality among a/b/tie wins (a tie plurality drops the unit);
    unanimous: every label must be the same non-tie label. ('all' keeps each label; see importers.)
    """
    counts = Counter(labels)
    if rule == "unanimous":
        if len(counts) == 1:
            (only,) = counts
            return (None, "tie") if only == "tie" else (only, "")
        return None, "not_unanimous"
    top = max(counts.values())
    winners = [label for label, n in counts.items() if n == top]
    if len(winners) > 1:
        return None, "no_majority"
    return (None, "tie") if winners[0] == "tie" else (winners[0], "")


def raw_agreement(units: Sequence[Sequence[str]]) -> float | None:
    """Pooled pairwise agreement: over units with >= 2 labels, agreeing unordered pairs / all pairs."""
    agree = pairs = 0
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        pairs += m * (m - 1) // 2
        agree += sum(n * (n - 1) // 2 for n in Counter(labels).values())
    return agree / pairs if pairs else None


def krippendorff_alpha_nominal(units: Sequence[Sequence[str]]) -> float | None:
    """Krippendorff's alpha for nominal labels; None when it is undefined (fewer than 2 pairable labels, or
    every label the same category so expected disagreement is 0)."""
    coincidence: Counter[tuple[str, str]] = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for x, y in permutations(labels, 2):  # ordered pairs of distinct positions
            coincidence[(x, y)] += 1.0 / (m - 1)
    n_c: Counter[str] = Counter()
    for (x, _), w in coincidence.items():
        n_c[x] += w
    n = sum(n_c.values())
    if n < 2:
        return None
    observed = sum(w for (x, y), w in coincidence.items() if x != y)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa for two annotators' labels of the same units (aligned lists); None when undefined."""
    if len(first) != len(second) or not first:
        return None
    n = len(first)
    p_o = sum(x == y for x, y in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    p_e = sum(c1[c] * c2[c] for c in set(c1) | set(c2)) / (n * n)
    if p_e == 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def agreement_report(units: Sequence[Sequence[tuple[str | None, str]]]) -> dict[str, object]:
    """Agreement statistics over units given as lists of (annotator id or None, label).

    Returns units_multi (units with >= 2 labels), raw_agreement, krippendorff_alpha, cohen_kappa (two named
    annotators only, else None) and per_annotator {labels, ties, agreement: the share of the other labels on
    the same pairs that match this annotator's}.
    """
    multi = [u for u in units if len(u) >= 2]
    labels_only = [[label for _, label in u] for u in multi]
    annotators = sorted({a for u in multi for a, _ in u if a is not None})
    kappa = None
    if len(annotators) == 2 and all(a is not None for u in multi for a, _ in u):
        first, second = [], []
        for u in multi:
            by = dict(u)
            if len(u) == 2 and set(by) == set(annotators):
                first.append(by[annotators[0]])
                second.append(by[annotators[1]])
        kappa = cohen_kappa(first, second)
    per: dict[str, dict[str, float]] = {}
    agree_n: Counter[str] = Counter()
    pairs_n: Counter[str] = Counter()
    for u in units:
        for i, (a, label) in enumerate(u):
            name = a if a is not None else "(anonymous)"
            stats = per.setdefault(name, {"labels": 0, "ties": 0})
            stats["labels"] += 1
            stats["ties"] += label == "tie"
            others = [other for j, (_, other) in enumerate(u) if j != i]
            pairs_n[name] += len(others)
            agree_n[name] += sum(other == label for other in others)
    for name, stats in per.items():
        if pairs_n[name]:
            stats["agreement"] = round(agree_n[name] / pairs_n[name], 4)
    return {
        "units_multi": len(multi),
        "raw_agreement": raw_agreement(labels_only),
        "unanimous_fraction": (sum(len(set(u)) == 1 for u in labels_only) / len(multi)) if multi else None,
        "krippendorff_alpha": krippendorff_alpha_nominal(labels_only),
        "cohen_kappa": kappa,
        "annotators": len(per),
        "per_annotator": dict(sorted(per.items())),
    }
