"""Canonical records and their JSONL files.

- SFT example: `messages` (list of {role, content}), or `prompt` + `completion` (strings or message lists).
- Preference: `prompt` (messages), `chosen` / `rejected` (one assistant message each), `meta`.
- Prompt-only: `prompt` (messages), `meta`.
Readers accept plain-text prompts/responses and normalise them to messages. Every error names file:line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from align.errors import DataError
from align.runs import atomic_write_text

ROLES = ("system", "user", "assistant", "tool")


class Message(TypedDict):
    role: str
    content: str


def prompt_id(prompt: list[Message]) -> str:
    """Content hash of a prompt (16 hex digits): the key for resume and for matching prompts across files."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def read_jsonl(path: Path | str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line is a DataError naming file:line.
    An `hf:org/name[:config][@split]` dataset yields its rows numbered from 1 (align/data/hub.py)."""
    if str(path).startswith("hf:"):
        from align.data.hub import hub_rows

        yield from enumerate(hub_rows(str(path)), start=1)
        return
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (relative paths start at the repo root)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; it needs one JSON object per line")
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors start UTF-8 files with a BOM
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text; re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"each line must be one JSON object") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply; each line must be one flat record") from None
            seen = True
            yield lineno, obj
    if not seen:
        raise DataError(f"{path}: file has no records; it needs one JSON object per line")


def write_jsonl(path: Path | str, rows: Iterable[Any]) -> int:
    """Write rows atomically; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


def check_text(text: str, where: str, field_name: str) -> str:
    """A string that can be written back as UTF-8: a lone surrogate ("\\ud800") is valid JSON but not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {field_name} has an invalid character at position {e.start} (a lone UTF-16 "
                        f"surrogate); fix the text") from None
    return text


def check_messages(value: Any, where: str, *, field_name: str = "messages") -> list[Message]:
    """Validate a list of {role, content} messages (or a plain string, read as one user turn)."""
    if isinstance(value, str):
        check_text(value, where, field_name)
        if not value.strip():
            raise DataError(f"{where}: {field_name} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field_name} must be a non-empty list of {{role, content}} messages or a string")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {field_name}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field_name}[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {field_name}[{i}].content must be a string")
        check_text(m["content"], where, f"{field_name}[{i}].content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def as_response(value: Any, where: str, field_name: str) -> list[Message]:
    """A response as a one-message assistant list (accepts a plain string)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {field_name} is empty")
        return [{"role": "assistant", "content": value}]
    msgs = check_messages(value, where, field_name=field_name)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{where}: {field_name} must end with a non-empty assistant message")
    return msgs


@dataclass
class SFTExample:
    messages: list[Message]
    origin: str  # "file:line"


def sft_example(obj: Any, where: str) -> SFTExample:
    """One SFT row: {"messages": [...]} or {"prompt": ..., "completion": ...}."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages' or 'prompt'/'completion'")
    if "messages" in obj:
        msgs = check_messages(obj["messages"], where)
    elif "prompt" in obj and "completion" in obj:
        msgs = check_messages(obj["prompt"], where, field_name="prompt") + as_response(
            obj["completion"], where, "completion")
    else:
        raise DataError(f"{where}: missing field: give 'messages', or 'prompt' and 'completion' "
                        f"(found: {', '.join(sorted(obj)) or 'nothing'})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to learn from; add an assistant turn")
    return SFTExample(messages=msgs, origin=where)


def read_sft(path: Path | str) -> list[SFTExample]:
    return [sft_example(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]


@dataclass
class PreferenceRecord:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "meta": self.meta}


def preference_record(obj: Any, where: str) -> PreferenceRecord:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with prompt, chosen, rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; a preference needs prompt, chosen, "
                        f"rejected (run `align import` to convert other formats)")
    rec = PreferenceRecord(prompt=check_messages(obj["prompt"], where, field_name="prompt"),
                           chosen=as_response(obj["chosen"], where, "chosen"),
                           rejected=as_response(obj["rejected"], where, "rejected"),
                           meta=check_meta(obj.get("meta"), where))
    if rec.chosen == rec.rejected:
        raise DataError(f"{where}: chosen and rejected are identical; drop the row or fix the label")
    return rec


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """`meta` is an object (or absent); a `margin` in it is a finite number (the reward stage subtracts it)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    margin = meta.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DataError(f"{where}: meta.margin must be a finite number, got {margin!r}")
    return meta


def read_preferences(path: Path | str) -> list[PreferenceRecord]:
    return [preference_record(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]


@dataclass
class PromptRecord:
    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "meta": self.meta}


def read_prompts(path: Path | str) -> list[PromptRecord]:
    """Prompt-only rows: {"prompt": str | messages}; SFT/preference rows also work (their prompt part is used)."""
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with 'prompt'")
        if "prompt" in obj:
            prompt = check_messages(obj["prompt"], where, field_name="prompt")
        elif "messages" in obj:
            msgs = check_messages(obj["messages"], where)
            last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
            if last_user < 0:
                raise DataError(f"{where}: no user message to use as a prompt")
            prompt = msgs[: last_user + 1]
        else:
            raise DataError(f"{where}: missing field 'prompt' (a string or a list of messages)")
        meta = dict(check_meta(obj.get("meta"), where))
        meta.setdefault("origin", where)
        out.append(PromptRecord(prompt=prompt, meta=meta))
    return out
