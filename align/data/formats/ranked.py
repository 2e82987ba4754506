"""k-response formats: per-response scores/ratings and rankings, turned into pairs by the `pairs=` policy.

scores, one row per response: {prompt, response, score|rating, annotator?}; rows are grouped by
  (prompt, annotator) after reading, then paired.
scores, one row per prompt: {prompt, completions: [{response, score|rating}, ...]} or
  {prompt, responses: [...], scores|ratings: [...]}.
rankings: {prompt, responses: [...], ranks: [...]} (1 = best; equal ranks are ties) or
  {prompt, completions: [{response, rank}, ...]}.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from align.data.formats.pairs import require_object
from align.data.formats.votes import Context, Parsed, Rated, lookup, ranked_votes, row_annotator
from align.data.records import Message
from align.data.validate import Rejected, number, prompt_messages, response_messages

SCORE_KEYS = ("score", "rating", "overall_score")
SCORES_KEYS = ("scores", "ratings")
RANK_KEYS = ("ranks", "ranking")
TEXT_KEYS = ("response", "text", "content", "completion", "output")


def _first_completion(row: dict) -> dict | None:
    items = row.get("completions")
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else None


def detect_scores(row: dict) -> bool:
    if "prompt" not in row:
        return False
    first = _first_completion(row)
    return (("response" in row and any(k in row for k in SCORE_KEYS))
            or ("responses" in row and any(k in row for k in SCORES_KEYS))
            or (first is not None and any(k in first for k in SCORE_KEYS)))


def detect_rankings(row: dict) -> bool:
    if "prompt" not in row:
        return False
    first = _first_completion(row)
    return ("responses" in row and any(k in row for k in RANK_KEYS)) or (first is not None and "rank" in first)


def _items(row: dict, value_keys: tuple[str, ...], list_keys: tuple[str, ...], what: str) -> list[tuple[Any, Any]]:
    """(response, value) pairs from `completions: [{response, <value>}]` or parallel `responses` + list."""
    if row.get("completions") is not None:
        items = row["completions"]
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise Rejected("wrong_type", "completions must be a list of objects with a response and a " + what)
        return [(lookup(c, TEXT_KEYS), lookup(c, value_keys)) for c in items]
    responses, values = row.get("responses"), lookup(row, list_keys)
    if responses is None or values is None:
        raise Rejected("missing_field", f"give completions: [{{response, {what}}}] or responses + {list_keys[0]}")
    if not isinstance(responses, list) or not isinstance(values, list):
        raise Rejected("wrong_type", f"responses and {list_keys[0]} must be lists")
    if len(responses) != len(values):
        raise Rejected("wrong_type", f"{len(responses)} responses but {len(values)} {list_keys[0]}")
    return list(zip(responses, values))


def _responses(items: list[tuple[Any, Any]]) -> list[list[Message]]:
    return [response_messages(r, f"responses[{i}]") for i, (r, _) in enumerate(items)]


def parse_scores(row: Any, ctx: Context) -> Parsed:
    row = require_object(row)
    prompt = prompt_messages(row.get("prompt"))
    annotator = row_annotator(row)
    if "completions" not in row and "responses" not in row:  # one row per response
        response = response_messages(row.get("response"), "response")
        score = number(lookup(row, SCORE_KEYS), "score")
        return Parsed(rated=[Rated(prompt, response, score, annotator, ctx.origin, ctx.row)])
    items = _items(row, SCORE_KEYS, SCORES_KEYS, "score")
    responses = _responses(items)
    values = [number(v, f"scores[{i}]") for i, (_, v) in enumerate(items)]
    out = Parsed()
    ranked_votes(ctx, prompt, responses, values, annotator, out, use_margin=True)
    return out


def parse_rankings(row: Any, ctx: Context) -> Parsed:
    row = require_object(row)
    prompt = prompt_messages(row.get("prompt"))
    items = _items(row, ("rank",), RANK_KEYS, "rank")
    responses = _responses(items)
    ranks = [number(v, f"ranks[{i}]") for i, (_, v) in enumerate(items)]
    out = Parsed()
    ranked_votes(ctx, prompt, responses, [-r for r in ranks], row_annotator(row), out, use_margin=False)
    return out


def _key(messages: Sequence[Message]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def group_rated(rated: list[Rated], pairs: str, min_margin: float) -> tuple[list[tuple[Parsed, list[int]]],
                                                                            dict[int, str]]:
    """Pair one-row-per-response scores per (prompt, annotator) by the pair policy.

    Returns (Parsed, member rows) per group and {row: reason} for rows in groups that produced no vote at all
    (a lone response: single_response; only small margins: below_min_margin).
    """
    groups: dict[tuple[str, str | None], list[Rated]] = defaultdict(list)
    for r in rated:
        groups[(_key(r.prompt), r.annotator)].append(r)
    parsed, failed = [], {}
    for members in groups.values():
        ctx = Context(row=members[0].row, origin=members[0].origin, pairs=pairs, min_margin=min_margin)
        out = Parsed()
        try:
            ranked_votes(ctx, members[0].prompt, [m.response for m in members], [m.score for m in members],
                         members[0].annotator, out, use_margin=True, origins=[m.origin for m in members],
                         rows=[m.row for m in members])
        except Rejected as e:
            failed.update({m.row: e.reason for m in members})
            continue
        if not out.votes:
            reason = out.dropped.most_common(1)[0][0] if out.dropped else "single_response"
            failed.update({m.row: reason for m in members})
        parsed.append((out, [m.row for m in members]))
    return parsed, failed
