"""What the `llm` and `openai` judges share: a Jinja prompt rendered in a sandbox, verdict parsing, and judging
each pair in both orders so that a judge's preference for the first (or second) position cancels out.

This is the one place where position bias is handled: callers (the judge stage, eval) call `judge()` once per
pair and get a verdict that already accounts for both orders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import to_dict
from align.data.records import Message
from align.errors import ConfigError
from align.judges import Verdict, failure
from align.judges.parse import parse_verdict

REPO_JUDGES = Path(__file__).resolve().parent.parent.parent / "judges"
RAW_CHARS = 300  # how much of a judge's raw answer is kept as the rationale / in failures.jsonl


class CallError(Exception):
    """A judge call that failed for good (HTTP error after retries, malformed reply). Returned, not raised."""


@dataclass(frozen=True)
class Answer:
    """A judge model's reply to one rendered prompt: its text and, when known, `p_first`, the probability it
    gave the response shown first ("A") over the one shown second ("B"), read from log-probabilities."""

    text: str
    p_first: float | None = None


Reply = str | Answer | CallError
Complete = Callable[[list[list[Message]]], list[Reply]]
Decide = Literal["text", "prob"]
_SWAP = {"a": "b", "b": "a", "tie": "tie"}


def find_template(name: str) -> Path:
    """A template path as given, else under ./judges/, else under the repository's judges/."""
    for candidate in (Path(name), Path("judges") / name, REPO_JUDGES / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"judge template {name!r} not found (looked in ., judges/ and {REPO_JUDGES}); "
                      f"give a path to a .jinja file")


class PairPrompt:
    """A compiled judge prompt: `render(prompt, a, b)` -> chat messages for the judge model."""

    def __init__(self, template_path: Path, system: str = "", criteria: str = "") -> None:
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.template_path, self.system, self.criteria = Path(template_path), system, criteria
        # Sandboxed and immutable: a template from a shared recipe cannot reach Python internals or mutate data.
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        try:
            self.template = env.from_string(self.template_path.read_text(encoding="utf-8-sig"))
        except TemplateSyntaxError as e:
            raise ConfigError(f"{self.template_path}:{e.lineno}: template syntax error: {e.message}") from None

    def render(self, prompt: list[Message], response_a: str, response_b: str) -> list[Message]:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
        try:
            text = self.template.render(conversation=prompt, question=question, response_a=response_a,
                                        response_b=response_b, criteria=self.criteria)
        except UndefinedError as e:
            raise ConfigError(f"{self.template_path}: {e.message}; the template may use conversation, question, "
                              f"response_a, response_b, criteria") from None
        except SecurityError as e:
            raise ConfigError(f"{self.template_path}: the sandbox refused an operation ({e}); templates may only "
                              f"format the given variables") from None
        messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": text.strip()}]


def prompt_identity(cfg: Any, transport: tuple[str, ...], prompt: PairPrompt) -> dict[str, Any]:
    """A prompted judge's verdict-determining settings: its options minus `transport` ones, with the template
    named by the sha256 of its text (editing the template re-judges; renaming the file does not)."""
    options = {k: v for k, v in to_dict(cfg).items() if k not in transport and k != "template"}
    return {**options, "template_sha256": hashlib.sha256(prompt.template_path.read_bytes()).hexdigest()}


def _side(p_first: float) -> str:
    return "a" if p_first > 0.5 else "b" if p_first < 0.5 else "tie"


def combine(first: Reply, second: Reply | None, *, decide: Decide = "text", min_confidence: float = 0.0) -> Verdict:
    """Verdict from the answer with (a, b) shown as (A, B) and, if judged both ways, the one with them swapped.

    decide="text": each answer's text is parsed; orders that disagree abstain. decide="prob": each answer's
    p_first is used; P(a better) is their mean (after swapping the second back), the larger side wins.
    Either way `confidence` is the mean probability of the picked side when log-probabilities are known, and a
    pick below `min_confidence` abstains.
    """
    replies = [first] if second is None else [first, second]
    for reply in replies:
        if isinstance(reply, CallError):
            return failure(str(reply))
    answers = [r if isinstance(r, Answer) else Answer(str(r)) for r in replies]
    # P(a is better) per order: the second order showed b as "A".
    p_a = [None if ans.p_first is None else (ans.p_first if i == 0 else 1.0 - ans.p_first)
           for i, ans in enumerate(answers)]
    if decide == "prob":
        if any(p is None for p in p_a):
            return failure(f"no log-probabilities for A/B in the judge's answer {answers[0].text[:RAW_CHARS]!r}")
        read = [_side(p) for p in p_a]  # type: ignore[arg-type]
        mean = sum(p_a) / len(p_a)  # type: ignore[arg-type]
        winner = _side(mean)
        reason = f"P(a better) {mean:.3f} (" + "; ".join(
            f"{who} shown first: {p:.3f}" for who, p in zip(("a", "b"), p_a)) + ")"
        confidence = max(mean, 1.0 - mean)
    else:
        parsed = [parse_verdict(ans.text) for ans in answers]
        for ans, choice in zip(answers, parsed):
            if choice is None:
                return failure(f"unparseable judge output: {ans.text[:RAW_CHARS]!r}")
        read = [choice if i == 0 else _SWAP[choice] for i, choice in enumerate(parsed)]  # type: ignore[index]
        if len(read) == 2 and read[0] != read[1]:
            return Verdict("abstain", reason=f"orders disagree (a shown first: {read[0]}; b shown first: {read[1]})",
                           orders=tuple(read))
        winner, reason = read[0], answers[0].text.strip()[:RAW_CHARS]
        known = [p for p in p_a if p is not None]
        confidence = None
        if known and winner in ("a", "b"):
            mean = sum(known) / len(known)
            confidence = mean if winner == "a" else 1.0 - mean
    if winner in ("a", "b") and confidence is not None and confidence < min_confidence:
        return Verdict("abstain", reason=f"confidence {confidence:.3f} below min_confidence {min_confidence:g} "
                                         f"({reason})", orders=tuple(read), confidence=confidence)
    return Verdict(winner, reason=reason, orders=tuple(read), confidence=confidence)  # type: ignore[arg-type]


def judge_pairs(complete: Complete, pair_prompt: PairPrompt, prompts: list[list[Message]],
                response_pairs: list[tuple[str, str]], both_orders: bool, *, decide: Decide = "text",
                min_confidence: float = 0.0) -> list[Verdict]:
    """Render every pair (twice with `both_orders`), send them to `complete` in one batch, combine the answers."""
    chats = [pair_prompt.render(p, a, b) for p, (a, b) in zip(prompts, response_pairs)]
    if both_orders:
        chats += [pair_prompt.render(p, b, a) for p, (a, b) in zip(prompts, response_pairs)]
    answers = complete(chats)
    if len(answers) != len(chats):
        raise ConfigError(f"judge backend returned {len(answers)} answers for {len(chats)} prompts")
    n = len(response_pairs)
    return [combine(answers[i], answers[n + i] if both_orders else None, decide=decide,
                    min_confidence=min_confidence) for i in range(n)]
