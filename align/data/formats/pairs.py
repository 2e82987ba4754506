"""Two-response formats: pairs (prompt/chosen/rejected), pairs_ab (response_a/response_b + a/b/tie),
Anthropic HH transcripts and Stanford SHP rows."""

from __future__ import annotations

import re
from typing import Any

from align.data.formats.votes import Context, Parsed, lookup, make_vote, row_annotator
from align.data.records import Message
from align.data.validate import Rejected, ab_label, number, prompt_messages, response_messages, text

PREFERENCE_KEYS = ("preference", "label", "winner", "choice")


def require_object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise Rejected("not_an_object", f"expected an object with named fields, got {type(row).__name__}")
    return row


def _optional_number(row: dict, key: str) -> float | None:
    return number(row[key], key) if row.get(key) not in (None, "") else None


def split_conversations(chosen: list[Message], rejected: list[Message]) -> list[Message]:
    """The shared prompt of two full conversations that differ only in their final assistant turn."""
    if chosen[:-1] != rejected[:-1]:
        raise Rejected("prompt_mismatch", "the two conversations differ before their final assistant turn")
    if not chosen[:-1]:
        raise Rejected("missing_field", "no prompt: the conversations have only the final assistant turn")
    return chosen[:-1]


# --- pairs -------------------------------------------------------------------------------------------------

def detect_pairs(row: dict) -> bool:
    if "chosen" not in row or "rejected" not in row:
        return False
    implicit = isinstance(row["chosen"], list) and isinstance(row["rejected"], list)
    return "prompt" in row or implicit


def parse_pairs(row: Any, ctx: Context) -> Parsed:
    """{prompt, chosen, rejected} (text or messages); without a prompt, chosen/rejected may be whole
    conversations sharing everything but the last assistant turn (TRL's implicit-prompt form)."""
    row = require_object(row)
    if row.get("prompt") is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        chosen_all = prompt_messages(row["chosen"], "chosen")
        rejected_all = prompt_messages(row["rejected"], "rejected")
        prompt = split_conversations(chosen_all, rejected_all)
        chosen = response_messages(chosen_all[-1:], "chosen")
        rejected = response_messages(rejected_all[-1:], "rejected")
    else:
        prompt = prompt_messages(row.get("prompt"))
        chosen = response_messages(row.get("chosen"), "chosen")
        rejected = response_messages(row.get("rejected"), "rejected")
    s_c, s_r = _optional_number(row, "score_chosen"), _optional_number(row, "score_rejected")
    vote = make_vote(ctx, prompt, chosen, rejected, "a", row_annotator(row),
                     scores=(s_c, s_r) if s_c is not None and s_r is not None else None)
    margin = _optional_number(row, "margin")
    if margin is not None:
        vote.extra["margin"] = margin
    return Parsed(votes=[vote])


# --- pairs_ab ----------------------------------------------------------------------------------------------

def detect_pairs_ab(row: dict) -> bool:
    return {"prompt", "response_a", "response_b"} <= set(row) and lookup(row, PREFERENCE_KEYS) is not None


def parse_pairs_ab(row: Any, ctx: Context) -> Parsed:
    """{prompt, response_a, response_b, preference: a|b|tie} (also label/winner/choice; 1/2, model_a...)."""
    row = require_object(row)
    prompt = prompt_messages(row.get("prompt"))
    a = response_messages(row.get("response_a"), "response_a")
    b = response_messages(row.get("response_b"), "response_b")
    label = ab_label(lookup(row, PREFERENCE_KEYS), "preference", ("response_a",), ("response_b",))
    return Parsed(votes=[make_vote(ctx, prompt, a, b, label, row_annotator(row))])


# --- Anthropic HH ------------------------------------------------------------------------------------------

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def detect_hh(row: dict) -> bool:
    return ("prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
            and "Human:" in row["chosen"] and "Assistant:" in row["chosen"])


def transcript(value: Any, field: str) -> list[Message]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages; it must end with an Assistant turn."""
    raw = text(value, field)
    parts = _TURN.split(raw)
    if len(parts) < 3 or parts[0].strip():
        raise Rejected("malformed_transcript", f"{field} must be '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    msgs: list[Message] = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                           for role, content in zip(parts[1::2], parts[2::2])]
    if msgs[-1]["role"] != "assistant":
        raise Rejected("malformed_transcript", f"{field} does not end with an Assistant turn")
    return msgs


def parse_hh(row: Any, ctx: Context) -> Parsed:
    """{chosen, rejected} full HH dialogues: the shared turns become the (multi-turn) prompt."""
    row = require_object(row)
    chosen_all = transcript(row.get("chosen"), "chosen")
    rejected_all = transcript(row.get("rejected"), "rejected")
    prompt = split_conversations(chosen_all, rejected_all)
    if not any(m["content"] for m in prompt):
        raise Rejected("empty_text", "the shared prompt turns are empty")
    chosen = response_messages(chosen_all[-1]["content"], "chosen")
    rejected = response_messages(rejected_all[-1]["content"], "rejected")
    return Parsed(votes=[make_vote(ctx, prompt, chosen, rejected, "a", row_annotator(row))])


# --- Stanford SHP ------------------------------------------------------------------------------------------

def detect_shp(row: dict) -> bool:
    return {"history", "human_ref_A", "human_ref_B"} <= set(row)


def parse_shp(row: Any, ctx: Context) -> Parsed:
    """{history, human_ref_A, human_ref_B, labels (1: A is preferred, 0: B), score_A, score_B}."""
    row = require_object(row)
    prompt = prompt_messages(row.get("history"), "history")
    a = response_messages(row.get("human_ref_A"), "human_ref_A")
    b = response_messages(row.get("human_ref_B"), "human_ref_B")
    raw = row.get("labels")
    if raw is None or raw == "":
        raise Rejected("missing_field", "labels is missing")
    if isinstance(raw, bool) or str(raw).strip() not in ("0", "1", "0.0", "1.0"):
        raise Rejected("unknown_label", f"labels={str(raw)[:40]!r}; SHP labels are 1 (A preferred) or 0 (B)")
    label = "a" if str(raw).strip().startswith("1") else "b"
    s_a, s_b = _optional_number(row, "score_A"), _optional_number(row, "score_B")
    return Parsed(votes=[make_vote(ctx, prompt, a, b, label, row_annotator(row),
                                   scores=(s_a, s_b) if s_a is not None and s_b is not None else None)])
