"""What every format parser produces: votes (one annotator's verdict on one response pair) and ratings (one
scored response, paired later), plus the pair policy shared by scores and rankings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from align.data.records import Message
from align.data.validate import Rejected, annotator_id

PAIR_POLICIES = ("best_vs_worst", "best_vs_rest", "all")
ANNOTATOR_KEYS = ("annotator", "annotator_id", "worker_id", "labeler", "rater", "user_id")


@dataclass(frozen=True)
class Context:
    """Per-row parsing context: where the row came from and the settings that shape pairs."""

    row: int  # index of the row in the import's ledger
    origin: str  # "file:line" or "file[index]"
    pairs: str = "best_vs_worst"
    min_margin: float = 0.0
    question: str | None = None  # columns.preference: the Label Studio control / Argilla question to read


@dataclass
class Vote:
    """One label: `label` says which of `a` / `b` is better ('tie' for neither) for `prompt`."""

    prompt: list[Message]
    a: list[Message]
    b: list[Message]
    label: str  # 'a' | 'b' | 'tie'
    annotator: str | None
    origin: str
    rows: tuple[int, ...]
    scores: tuple[float, float] | None = None  # (score of a, score of b) where the label came from scores
    extra: dict[str, Any] = field(default_factory=dict)  # source metadata carried into meta


@dataclass
class Rated:
    """One scored response (one-row-per-response score files); grouped by (prompt, annotator) into votes."""

    prompt: list[Message]
    response: list[Message]
    score: float
    annotator: str | None
    origin: str
    row: int


@dataclass
class Parsed:
    """A row's output. `dropped` counts labels inside the row that were skipped (cancelled, ties, margins...)."""

    votes: list[Vote] = field(default_factory=list)
    rated: list[Rated] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def lookup(row: dict, names: Sequence[str]) -> Any:
    """The value of the first of `names` present (not None) in `row`, else None."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def row_annotator(row: dict) -> str | None:
    return annotator_id(lookup(row, ANNOTATOR_KEYS))


def make_vote(ctx: Context, prompt: list[Message], a: list[Message], b: list[Message], label: str,
              annotator: str | None, *, scores: tuple[float, float] | None = None, origin: str | None = None,
              rows: tuple[int, ...] | None = None) -> Vote:
    """A vote, or Rejected('same_response') when the two responses are identical."""
    if a == b:
        raise Rejected("same_response", "the two responses are identical")
    return Vote(prompt=prompt, a=a, b=b, label=label, annotator=annotator, origin=origin or ctx.origin,
                rows=rows if rows is not None else (ctx.row,), scores=scores)


def policy_pairs(values: Sequence[float], policy: str) -> list[tuple[int, int]]:
    """Index pairs (better-or-equal, other) to compare for responses with `values` (higher is better).

    best_vs_worst: the top response against the bottom one; best_vs_rest: the top against each other one;
    all: every pair. Ties keep file order (stable sort).
    """
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if len(order) < 2:
        return []
    if policy == "best_vs_worst":
        return [(order[0], order[-1])]
    if policy == "best_vs_rest":
        return [(order[0], j) for j in order[1:]]
    return list(combinations(order, 2))


def ranked_votes(ctx: Context, prompt: list[Message], responses: Sequence[list[Message]],
                 values: Sequence[float], annotator: str | None, out: Parsed, *, use_margin: bool,
                 origins: Sequence[str] | None = None, rows: Sequence[int] | None = None) -> None:
    """Append the policy's votes for k scored/ranked responses to `out` (higher value is better).

    Equal values become 'tie' votes (dropped and counted later); with `use_margin`, differences below
    min_margin are dropped here and counted as below_min_margin. Identical responses count as same_response.
    """
    if len(responses) < 2:
        raise Rejected("single_response", f"{len(responses)} response(s); need at least 2 to form a pair")
    for i, j in policy_pairs(values, ctx.pairs):
        diff = values[i] - values[j]
        if use_margin and 0 < diff < ctx.min_margin:
            out.dropped["below_min_margin"] += 1
            continue
        try:
            vote = make_vote(ctx, prompt, responses[i], responses[j], "a" if diff > 0 else "tie", annotator,
                             scores=(values[i], values[j]) if use_margin else None,
                             origin=f"{origins[i]} + {origins[j]}" if origins else None,
                             rows=(rows[i], rows[j]) if rows else None)
        except Rejected as e:
            out.dropped[e.reason] += 1
            continue
        out.votes.append(vote)
