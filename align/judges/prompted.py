"""What the `llm` and `openai` judges share: a Jinja prompt rendered in a sandbox, verdict parsing, and judging
each pair in both orders so that a judge's preference for the first (or second) position cancels out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from align.data.records import Message
from align.errors import ConfigError
from align.judges import Verdict, failure
from align.judges.parse import parse_verdict

REPO_JUDGES = Path(__file__).resolve().parent.parent.parent / "judges"
RAW_CHARS = 300  # how much of a judge's raw answer is kept as the rationale / in failures.jsonl


class CallError(Exception):
    """A judge call that failed for good (HTTP error after retries, malformed reply). Returned, not raised."""


Complete = Callable[[list[list[Message]]], list["str | CallError"]]


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
            self.template = env.from_string(self.template_path.read_text())
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


def combine(first: str | CallError, second: str | CallError | None) -> Verdict:
    """Verdict from the answer with (a, b) shown as (A, B) and, if judged both ways, the one with them swapped."""
    answers = [first] if second is None else [first, second]
    for answer in answers:
        if isinstance(answer, CallError):
            return failure(str(answer))
    read = [parse_verdict(str(answer)) for answer in answers]
    for answer, choice in zip(answers, read):
        if choice is None:
            return failure(f"unparseable judge output: {str(answer)[:RAW_CHARS]!r}")
    if second is not None:  # the second answer saw b as "A": swap it back
        read[1] = {"a": "b", "b": "a", "tie": "tie"}[read[1]]
    reason = str(first).strip()[:RAW_CHARS]
    if len(read) == 2 and read[0] != read[1]:
        return Verdict("abstain", reason=f"orders disagree (a shown first: {read[0]}; b shown first: {read[1]})",
                       orders=tuple(read))
    return Verdict(read[0], reason=reason, orders=tuple(read))  # type: ignore[arg-type]


def judge_pairs(complete: Complete, pair_prompt: PairPrompt, prompts: list[list[Message]],
                response_pairs: list[tuple[str, str]], both_orders: bool) -> list[Verdict]:
    """Render every pair (twice with `both_orders`), send them to `complete` in one batch, combine the answers."""
    chats = [pair_prompt.render(p, a, b) for p, (a, b) in zip(prompts, response_pairs)]
    if both_orders:
        chats += [pair_prompt.render(p, b, a) for p, (a, b) in zip(prompts, response_pairs)]
    answers = complete(chats)
    n = len(response_pairs)
    return [combine(answers[i], answers[n + i] if both_orders else None) for i in range(n)]
