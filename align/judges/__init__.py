"""AI judges: turn model responses into preferences.

A judge is any object with one of two methods (no base class to inherit):

- `PairwiseJudge.judge(prompts, response_pairs) -> list[Verdict]`: which of two responses is better.
- `ScoreJudge.score(prompts, responses) -> list[float | None]`: a scalar per response (None: it failed);
  the judge stage turns scores into pairs when they differ by at least `min_margin`.

Built-ins (`reward_model`, `llm`, `openai`, `rules`, `ensemble`) and plug-ins (`package.module:ClassName`, or
a name registered under the `align.judges` entry-point group) are built from a YAML spec by
`align.judges.registry.load_judge`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from align.data.records import Message

Winner = Literal["a", "b", "tie", "abstain"]
WINNERS = ("a", "b", "tie", "abstain")


@dataclass(frozen=True)
class Verdict:
    """A judgement of one (a, b) pair.

    `error` set means the judge failed on this pair (unparseable output, HTTP error after retries): it is
    counted and written to failures.jsonl, never turned into a preference. `orders` holds the winner read in
    each presentation order when the pair was judged both ways (a flip is when they differ). `confidence` is
    the judge's probability for the side it picked (0.5..1), when it can tell (log-probability verdicts).
    """

    winner: Winner
    reason: str = ""
    error: str | None = None
    orders: tuple[str, ...] = ()
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"Verdict winner must be one of {WINNERS}, got {self.winner!r}")

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_json(self) -> dict[str, Any]:
        return {"winner": self.winner, "reason": self.reason, "error": self.error, "orders": list(self.orders),
                "confidence": self.confidence}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        confidence = data.get("confidence")
        return cls(winner=data["winner"], reason=data.get("reason", ""), error=data.get("error"),
                   orders=tuple(data.get("orders") or ()),
                   confidence=None if confidence is None else float(confidence))


def failure(error: str) -> Verdict:
    return Verdict("abstain", error=error)


REDACTED = "[REDACTED]"
_BEARER = re.compile(r"\b(Bearer)\s+(?!\[REDACTED\])[^\s\"',;}\]]+", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(://)[^/@\s\"']+@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret (also JSON-escaped), any `Bearer <token>` and any `user:password@` in a URL
    replaced by [REDACTED]. Apply it before truncating, so no prefix of a key survives."""
    for secret in secrets:
        if secret:
            for form in {secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/")}:
                text = text.replace(form, REDACTED)
    text = _BEARER.sub(rf"\1 {REDACTED}", text)
    return _URL_USERINFO.sub(rf"\1{REDACTED}@", text)


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        """One Verdict per (prompt, (response_a, response_b))."""
        ...


@runtime_checkable
class ScoreJudge(Protocol):
    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        """One score per (prompt, response); higher is better; None where the judge failed."""
        ...


Judge = PairwiseJudge | ScoreJudge


def judge_kind(judge: Any) -> Literal["pairwise", "score"]:
    """'pairwise' or 'score' by the method the object has (exactly one of them)."""
    pairwise, score = callable(getattr(judge, "judge", None)), callable(getattr(judge, "score", None))
    if pairwise == score:
        raise TypeError(f"{type(judge).__name__} must define exactly one of judge(prompts, response_pairs) or "
                        f"score(prompts, responses)")
    return "pairwise" if pairwise else "score"


def verdict_from_scores(a: float, b: float, min_margin: float) -> Verdict:
    """a beats b when its score is at least `min_margin` higher; closer scores are a tie."""
    reason = f"scores {a:.4g} vs {b:.4g}"
    if a == b or abs(a - b) < min_margin - 1e-9:  # the tolerance keeps 0.5 - 0.45 from missing a 0.05 margin
        return Verdict("tie", reason=f"{reason} (margin below {min_margin:g})")
    return Verdict("a" if a > b else "b", reason=reason)
