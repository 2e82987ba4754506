"""Checks that turn raw annotation values into clean text and messages, or a `Rejected` with a reason code.

Every importer reports problems through `Rejected(reason, detail)`; the import stage writes each rejected row
to `rejects.jsonl` with its reason and origin and counts reasons in the manifest. `REASONS` lists every code.
"""

from __future__ import annotations

import math
import re
from typing import Any

from align.data.records import Message, as_response, check_messages
from align.errors import DataError

REASONS: dict[str, str] = {
    "unknown_task": "the label names a task id that is not in tasks=... (the `align label` run)",
    "task_mismatch": "the responses differ from those of the labelled task",
    "low_gold_accuracy": "the annotator's accuracy on gold tasks is below min_gold_accuracy",
    "invalid_json": "the line or file is not valid JSON",
    "undecodable": "bytes that are not UTF-8 (or lone surrogates) in a text",
    "not_an_object": "the row is not a JSON object / mapping",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "empty_text": "an empty prompt or response",
    "unknown_label": "a preference label that names neither response nor a tie",
    "same_response": "chosen and rejected are identical",
    "malformed_transcript": "an HH transcript without Human:/Assistant: turns ending in an Assistant turn",
    "prompt_mismatch": "an HH pair whose two dialogues differ before the final Assistant turn",
    "single_response": "fewer than two responses to compare for a prompt",
    "no_annotations": "a task/record with no annotations or responses at all",
    "cancelled": "every annotation of the task was cancelled (Label Studio)",
    "empty_annotation": "every annotation of the task had an empty result (Label Studio)",
    "not_submitted": "every response was a draft or discarded (Argilla)",
    "duplicate": "an exact repeat of an earlier label (same prompt, pair, verdict and annotator)",
    "tie": "the annotators (or scores/ranks) call it a tie",
    "below_min_margin": "the score difference is below min_margin",
    "no_majority": "aggregate=majority: no label has a strict plurality",
    "not_unanimous": "aggregate=unanimous: the annotators disagree",
    "too_long": "prompt + response is longer than max_length tokens",
}


class Rejected(Exception):
    """A row (or one label in it) that cannot be used; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogates(text: str) -> bool:
    """True for text decoded with errors='surrogateescape' from bad bytes (it cannot be written as UTF-8)."""
    return _SURROGATE.search(text) is not None


def text(value: Any, field: str) -> str:
    """A non-empty UTF-8 string."""
    if value is None:
        raise Rejected("missing_field", f"{field} is missing")
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"{field} must be text, got {type(value).__name__}")
    if has_surrogates(value):
        raise Rejected("undecodable", f"{field} has bytes that are not UTF-8")
    if not value.strip():
        raise Rejected("empty_text", f"{field} is empty")
    return value


def _check_list(value: list, field: str) -> None:
    for i, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and has_surrogates(m["content"]):
            raise Rejected("undecodable", f"{field}[{i}] has bytes that are not UTF-8")
    if value and all(isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip()
                     for m in value):
        raise Rejected("empty_text", f"{field} has only empty messages")


def prompt_messages(value: Any, field: str = "prompt") -> list[Message]:
    """A prompt as messages: a string (one user turn) or a list of {role, content}."""
    if value is None:
        raise Rejected("missing_field", f"{field} is missing")
    if isinstance(value, str):
        return [{"role": "user", "content": text(value, field)}]
    if isinstance(value, list):
        _check_list(value, field)
    try:
        return check_messages(value, field, field_name=field)
    except DataError as e:
        raise Rejected("wrong_type", str(e)) from None


def response_messages(value: Any, field: str) -> list[Message]:
    """A response as a one-message assistant list (a string, or messages ending with an assistant turn)."""
    if value is None:
        raise Rejected("missing_field", f"{field} is missing")
    if isinstance(value, str):
        text(value, field)
    elif isinstance(value, list):
        _check_list(value, field)
        last = value[-1] if value else None
        if isinstance(last, dict) and isinstance(last.get("content"), str) and not last["content"].strip():
            raise Rejected("empty_text", f"{field} ends with an empty message")
    try:
        return as_response(value, field, field)
    except DataError as e:
        raise Rejected("wrong_type", str(e)) from None


def number(value: Any, field: str) -> float:
    """A finite number (numeric strings from CSV are accepted)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Rejected("missing_field", f"{field} is missing")
    if isinstance(value, bool):
        raise Rejected("wrong_type", f"{field} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise Rejected("wrong_type", f"{field} must be a number, got {value[:40]!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("wrong_type", f"{field} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def annotator_id(value: Any, field: str = "annotator") -> str | None:
    """An annotator id as text (ints, and Label Studio {id, email} objects: the id); None when absent."""
    if isinstance(value, dict):
        value = value.get("id") if value.get("id") is not None else value.get("email") or value.get("username")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejected("wrong_type", f"{field} must be an id (text or number), got {type(value).__name__}")
    out = str(value)
    if has_surrogates(out):
        raise Rejected("undecodable", f"{field} has bytes that are not UTF-8")
    return out


def _norm(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


_A = {"a", "responsea", "answera", "modela", "completiona", "texta", "outputa", "left", "first", "1",
      "response1", "answer1", "text1", "output1", "completion1", "reply1"}
_B = {"b", "responseb", "answerb", "modelb", "completionb", "textb", "outputb", "right", "second", "2",
      "response2", "answer2", "text2", "output2", "completion2", "reply2"}
_TIE = {"tie", "equal", "same", "both", "neither", "draw", "tiebothbad", "bothbad", "bothgood", "nopreference"}


def ab_label(value: Any, field: str = "preference", a_names: tuple[str, ...] = (),
             b_names: tuple[str, ...] = ()) -> str:
    """'a' | 'b' | 'tie' from a preference value: a/b/tie, 1/2, left/right, model_a/model_b, or the name of the
    response field itself (`a_names`/`b_names`, e.g. 'answer1')."""
    if value is None or value == "":
        raise Rejected("missing_field", f"{field} is missing")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejected("wrong_type", f"{field} must be a label such as a, b or tie, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    key = _norm(str(value))
    if key in {_norm(n) for n in a_names} or (key in _A and key not in {_norm(n) for n in b_names}):
        return "a"
    if key in {_norm(n) for n in b_names} or key in _B:
        return "b"
    if key in _TIE:
        return "tie"
    shown = str(value)[:40].encode("utf-8", "backslashreplace").decode()
    raise Rejected("unknown_label", f"{field}={shown!r}; use a, b or tie (or the response's field name)")


def json_safe(value: Any) -> Any:
    """Make a raw row writable as strict UTF-8 JSON (for rejects.jsonl): bad text escaped, NaN -> None."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogates(value) else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return json_safe(str(value))
