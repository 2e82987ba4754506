"""Argilla exports: one record is one row; each user's submitted response is one annotator's label.

Three record shapes are read:
- v2 flattened (`dataset.records.to_list(flatten=True)`): fields at the top level and, per question,
  `q.responses` / `q.responses.users` / `q.responses.status` lists;
- v2 nested (`to_list()`): {fields: {...}, responses: {q: [{value, user_id, status?}]}};
- v1 FeedbackDataset (`FeedbackRecord` dicts): {fields: {...}, responses: [{user_id, status, values: {q: {value}}}]}.
The prompt is the `prompt` field (or instruction/question/input/request/query); responses are the fields named
response*/answer*/reply*/completion*/generation*/output*. Each user's answer is read from, in this order:
a ranking question (value: names best first, or [{value, rank}]), a label question naming the better
response (or tie), or one rating question per response (rating-1 <-> response-1). `columns.preference`
picks the question. Only `submitted` responses count; drafts and discarded ones are counted and skipped.
A null response field is left out, with any ranking of it: a dataset with k response fields (the first two
required) holds records with fewer responses, and Argilla's export fills their missing fields with null.
"""

from __future__ import annotations

import re
from typing import Any

from align.data.formats.pairs import require_object
from align.data.formats.votes import Context, Parsed, lookup, ranked_votes
from align.data.validate import Rejected, ab_label, annotator_id, number, prompt_messages, response_messages

PROMPT_KEYS = ("prompt", "instruction", "question", "input", "request", "query", "text")
RESPONSE_PREFIXES = ("response", "answer", "reply", "completion", "generation", "output", "candidate")
RECORD_KEYS = ("id", "_server_id", "status", "external_id", "inserted_at", "updated_at", "metadata")

UserAnswers = tuple[Any, Any, dict]  # (user id, status, {question: value})


def detect_argilla(row: dict) -> bool:
    return (isinstance(row.get("fields"), dict) and "responses" in row) or any(
        isinstance(k, str) and k.endswith(".responses") for k in row)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _as_list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise Rejected("wrong_type", f"{what} must be a list")
    return value


def _flattened(row: dict) -> tuple[dict, list[UserAnswers]]:
    fields = {k: v for k, v in row.items() if "." not in k and k not in RECORD_KEYS}
    users: dict[Any, UserAnswers] = {}
    for key in [k for k in row if isinstance(k, str) and k.endswith(".responses")]:
        question = key[: -len(".responses")]
        values = _as_list(row[key] if row[key] is not None else [], key)
        who = row.get(f"{key}.users") or [None] * len(values)
        status = row.get(f"{key}.status") or [None] * len(values)
        if not isinstance(who, list) or not isinstance(status, list) or not len(who) == len(status) == len(values):
            raise Rejected("wrong_type", f"{key}, {key}.users and {key}.status must be lists of equal length")
        for i, (value, user, st) in enumerate(zip(values, who, status)):
            ident = annotator_id(user, f"{key}.users") or f"(user {i + 1})"
            users.setdefault(ident, (ident, st, {}))[2][question] = value
    return fields, list(users.values())


def _nested(row: dict) -> tuple[dict, list[UserAnswers]]:
    fields, responses = row["fields"], row.get("responses")
    out: list[UserAnswers] = []
    if isinstance(responses, list):  # v1: one entry per user
        for r in responses:
            if not isinstance(r, dict) or not isinstance(r.get("values", {}), dict):
                raise Rejected("wrong_type", "responses must be a list of {user_id, status, values}")
            answers = {q: v.get("value") if isinstance(v, dict) else v for q, v in (r.get("values") or {}).items()}
            out.append((r.get("user_id"), r.get("status"), answers))
        return fields, out
    if isinstance(responses, dict):  # v2 nested: one list per question
        users: dict[Any, UserAnswers] = {}
        for question, entries in responses.items():
            for i, r in enumerate(_as_list(entries, f"responses.{question}")):
                if not isinstance(r, dict):
                    raise Rejected("wrong_type", f"responses.{question} must be a list of {{value, user_id}}")
                ident = annotator_id(r.get("user_id"), "user_id") or f"(user {i + 1})"
                users.setdefault(ident, (ident, r.get("status"), {}))[2][question] = r.get("value")
        return fields, list(users.values())
    if responses is None:
        return fields, []
    raise Rejected("wrong_type", "responses must be a list (v1) or a mapping of questions (v2)")


def _match(name: Any, keys: list[str]) -> int | None:
    """Index of the response field that `name` (a ranking value, label or rating question) refers to."""
    n = _norm(name)
    for how in ("exact", "contains", "digits"):
        for i, key in enumerate(keys):
            k = _norm(key)
            digits_n, digits_k = re.search(r"(\d+)$", n), re.search(r"(\d+)$", k)
            if ((how == "exact" and n == k) or (how == "contains" and k and k in n)
                    or (how == "digits" and digits_n and digits_k and digits_n.group(1) == digits_k.group(1))):
                return i
    return None


def _ranking_ranks(value: list, keys: list[str], absent: set[str] = frozenset()) -> dict[int, float]:
    ranks: dict[int, float] = {}
    for pos, item in enumerate(value):
        name, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (item, pos + 1)
        if isinstance(name, str) and _norm(name) in absent:
            continue  # the record has no such response (a null field)
        idx = _match(name, keys) if isinstance(name, (str, int)) and not isinstance(name, bool) else None
        if idx is None:
            raise Rejected("unknown_label", f"ranking names {str(name)[:40]!r}, which is not a response field")
        ranks[idx] = number(rank, "rank") if rank is not None else float(pos + 1)
    return ranks


def _label_ranks(value: Any, keys: list[str]) -> dict[int, float]:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise Rejected("unknown_label", f"label must be text, got {type(value).__name__}")
    idx = _match(value, keys) if _norm(value) not in ("a", "b") else None
    if idx is None:
        side = ab_label(value, "label", (keys[0],), (keys[1],) if len(keys) > 1 else ())
        if side == "tie":
            return {i: 1.0 for i in range(len(keys))}
        idx = 0 if side == "a" else 1
    return {i: 1.0 if i == idx else 2.0 for i in range(len(keys))}


def _user_ranks(answers: dict, keys: list[str], question: str | None,
                absent: set[str] = frozenset()) -> tuple[dict[int, float], bool]:
    """(response index -> rank where lower is better, came_from_ratings)."""
    if question is not None:
        if question not in answers:
            raise Rejected("missing_field", f"no answer to the question columns.preference={question!r}")
        answers = {question: answers[question]}
    for value in answers.values():
        if isinstance(value, list) and not (len(value) == 1 and isinstance(value[0], str)):
            return _ranking_ranks(value, keys, absent), False
    for value in answers.values():
        if isinstance(value, (str, list)):
            try:
                return _label_ranks(value, keys), False
            except Rejected:
                if question is not None:
                    raise
    ratings = {}
    for q, value in answers.items():
        idx = _match(q, keys)
        if idx is not None and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            ratings[idx] = -number(value, q)  # higher rating = better = lower "rank"
    if len(ratings) >= 2:
        return ratings, True
    raise Rejected("unknown_label", "no ranking, label or per-response rating answer")


def parse_argilla(row: Any, ctx: Context) -> Parsed:
    row = require_object(row)
    fields, users = _nested(row) if isinstance(row.get("fields"), dict) else _flattened(row)
    prompt = prompt_messages(lookup(fields, PROMPT_KEYS), "fields.prompt")
    absent: set[str] = set()
    if "response_a" in fields and "response_b" in fields:
        keys = ["response_a", "response_b"]
    else:
        keys = [k for k in fields if isinstance(k, str) and _norm(k).startswith(RESPONSE_PREFIXES)]
        absent = {_norm(k) for k in keys if fields[k] is None}
        keys = [k for k in keys if fields[k] is not None]
    if len(keys) < 2:
        raise Rejected("single_response", "fewer than two response fields (response*/answer*/reply*...); "
                                          "set columns.response_a/response_b")
    if not users:
        raise Rejected("no_annotations", "the record has no responses")
    responses = [response_messages(fields[k], f"fields.{k}") for k in keys]
    out = Parsed()
    for user, status, answers in users:
        if status not in (None, "submitted"):
            out.dropped["not_submitted"] += 1
            continue
        if not answers:
            out.dropped["empty_annotation"] += 1
            continue
        try:
            annotator = annotator_id(user, "user_id")
            ranks, from_ratings = _user_ranks(answers, keys, ctx.question, absent)
            idx = sorted(ranks)
            values = [-ranks[i] for i in idx]  # higher is better (the rating itself for rating questions)
            ranked_votes(ctx, prompt, [responses[i] for i in idx], values, annotator, out, use_margin=from_ratings)
        except Rejected as e:
            out.dropped[e.reason] += 1
    return out
