"""Label Studio exports of the pairwise, ranker and choices templates.

- JSON: a list of tasks {id, data: {...}, annotations: [{completed_by, was_cancelled, result: [...]}]}. One task
  is one row; each annotation is one annotator's label.
- JSON_MIN, CSV and TSV (what Label Studio's converter makes of the JSON export): one row per annotation, the
  task's data keys at the top level, each control's answer under the control's name (pairwise:
  [{"selected": "left"}], ranker: [{"ranker": {...}}], choices: the choice text), plus annotator (int id or
  email), annotation_id, created_at, updated_at and lead_time. CSV/TSV cells hold lists as JSON text and sort the
  columns. Cancelled annotations are left out of these exports; a task without annotations is one row with an
  empty annotation_id.

Understood result types (the first present, in this order, unless `columns.preference` names the control):
- pairwise: value.selected 'left' | 'right' over data's two responses (the <Pairwise toName="answer1,answer2">
  names, else response_a/response_b, answer1/answer2, text1/text2, ...);
- ranker: value.ranker {name: [item ids best first]} (or buckets, best bucket first) over a data list of
  {id, body|text|title} items;
- choices: value.choices naming the better answer (answer1 / 'A' / 'left' / 'tie' ...).
Cancelled annotations and annotations with an empty result are skipped and counted; predictions are ignored.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from align.data.formats.pairs import require_object
from align.data.formats.votes import Context, Parsed, lookup, make_vote, ranked_votes
from align.data.records import Message
from align.data.validate import Rejected, ab_label, annotator_id, prompt_messages, response_messages

PROMPT_KEYS = ("prompt", "question", "instruction", "input", "query", "context")
PAIR_KEYS = (("response_a", "response_b"), ("answer1", "answer2"), ("answer_a", "answer_b"),
             ("response1", "response2"), ("text1", "text2"), ("completion_a", "completion_b"),
             ("output_a", "output_b"), ("left", "right"))
ITEM_TEXT_KEYS = ("body", "text", "content", "html", "title")
RESULT_TYPES = ("pairwise", "ranker", "choices")
# columns the converter adds to every JSON_MIN / CSV / TSV row (the task's own data keys are the rest)
FLAT_KEYS = ("id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement", "history")
# data keys `align label` adds to each task, never a control's answer
TASK_KEYS = ("task_id", "prompt_id")
CHOICE_NAMES = ("choice", "choices", "better", "preference", "winner", "label", "comparison")


def detect_labelstudio(row: dict) -> bool:
    nested = isinstance(row.get("data"), dict) and ("annotations" in row or "completions" in row)
    return nested or {"annotator", "annotation_id", "lead_time"} <= set(row)


def _flat_value(value: Any) -> dict | None:
    """One control's answer in a flat row -> a JSON-export result (or None when it is not an answer)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        first = value[0]
        for kind, key in (("pairwise", "selected"), ("ranker", "ranker"), ("choices", "choices")):
            if key in first:
                return {"type": kind, "value": first}
    return None


def _flat_result(row: dict, control: str | None) -> dict | None:
    """The answer of a JSON_MIN / CSV / TSV row as a JSON-export result; None for an empty annotation."""
    if control:
        value = row.get(control)
        if value in (None, "", []):
            return None
        result = _flat_value(value) or {"type": "choices", "value": {"choices": [value]}}
        return {**result, "from_name": control}
    for name, value in row.items():
        result = _flat_value(value)
        if result is not None:
            return {**result, "from_name": name}
    # a single choice is exported as its bare text, like the data keys: rule those out by name
    taken = set(FLAT_KEYS + TASK_KEYS + PROMPT_KEYS + ITEM_TEXT_KEYS) | {k for pair in PAIR_KEYS for k in pair}
    texts = {k: v for k, v in row.items() if isinstance(k, str) and k not in taken and not k.startswith("_data_")
             and not k.endswith("_transcript") and isinstance(v, str) and v.strip()}
    named = [k for k in texts if k.lower() in CHOICE_NAMES]
    if len(named) == 1 or len(texts) == 1:
        name = named[0] if named else next(iter(texts))
        return {"type": "choices", "from_name": name, "value": {"choices": [texts[name]]}}
    if texts:
        raise Rejected("missing_field", f"cannot tell which column holds the answer ({', '.join(sorted(texts))}); "
                                        f"set columns.preference=<the control's name>")
    return None


def _flat_task(row: dict, control: str | None) -> dict:
    """A JSON_MIN / CSV / TSV row (one annotation) in the JSON export's task shape."""
    data = {k.removeprefix("_data_"): v for k, v in row.items() if k not in FLAT_KEYS}
    if row.get("annotation_id") in (None, ""):
        return {"data": data, "annotations": []}
    result = _flat_result(row, control)
    if result is not None:
        data.pop(result["from_name"], None)
    ann = {"id": row["annotation_id"], "completed_by": row.get("annotator"), "result": [result] if result else []}
    return {"data": data, "annotations": [ann]}


def _pair_keys(data: dict, result: dict) -> tuple[str, str]:
    to_name = result.get("to_name")
    if isinstance(to_name, str) and to_name.count(",") == 1:
        left, right = (s.strip() for s in to_name.split(","))
        if left in data and right in data and "response_a" not in data:
            return left, right
    for a, b in PAIR_KEYS:
        if a in data and b in data:
            return a, b
    raise Rejected("missing_field", "cannot find the two responses in data; set columns.response_a=... and "
                                    "columns.response_b=... to the data keys")


def _pick_result(results: list, control: str | None) -> dict:
    usable = [r for r in results if isinstance(r, dict)]
    if control:
        usable = [r for r in usable if r.get("from_name") == control]
        if not usable:
            raise Rejected("missing_field", f"no result from the control columns.preference={control!r}")
        return usable[0]
    for kind in RESULT_TYPES:
        for r in usable:
            if r.get("type") == kind:
                return r
    kinds = sorted({str(r.get("type")) for r in usable})
    raise Rejected("unknown_label", f"no pairwise, ranker or choices result (found: {', '.join(kinds) or 'none'})")


def _ranker_votes(ctx: Context, prompt: list[Message], data: dict, value: dict, annotator: str | None,
                  origin: str, out: Parsed) -> None:
    ranker = value.get("ranker")
    if not isinstance(ranker, dict) or not ranker:
        raise Rejected("missing_field", "ranker result has no value.ranker")
    listed = data.get("responses") if isinstance(data.get("responses"), list) else next(
        (v for v in data.values() if isinstance(v, list) and v and all(isinstance(i, dict) and "id" in i for i in v)),
        None)
    if not isinstance(listed, list):
        raise Rejected("missing_field", "no list of {id, body} items in data for the ranker")
    texts = {str(item.get("id")): lookup(item, ITEM_TEXT_KEYS) for item in listed if isinstance(item, dict)}
    buckets = [k for k in ranker if k != "_"] or ["_"]
    tiers = [ranker[buckets[0]]] if len(buckets) == 1 else [ranker[k] for k in buckets]
    flat = len(buckets) == 1
    responses, ranks = [], []
    for t, tier in enumerate(tiers):
        if not isinstance(tier, list):
            raise Rejected("wrong_type", "ranker value must map a name to a list of item ids")
        for pos, item_id in enumerate(tier):
            if str(item_id) not in texts:
                raise Rejected("unknown_label", f"ranked item id {str(item_id)[:40]!r} is not in the task's list")
            responses.append(response_messages(texts[str(item_id)], f"item {item_id}"))
            ranks.append(float(pos if flat else t))
    ranked_votes(replace(ctx, origin=origin), prompt, responses, [-r for r in ranks], annotator, out,
                 use_margin=False)


def _annotation(ctx: Context, prompt: list[Message], data: dict, ann: dict, control: str | None,
                origin: str, out: Parsed) -> None:
    annotator = annotator_id(ann.get("completed_by"), "completed_by")
    result = _pick_result(ann["result"], control)
    value = result.get("value")
    if not isinstance(value, dict):
        raise Rejected("wrong_type", "result.value must be an object")
    if result.get("type") == "ranker":
        _ranker_votes(ctx, prompt, data, value, annotator, origin, out)
        return
    a_key, b_key = _pair_keys(data, result)
    a = response_messages(data[a_key], f"data.{a_key}")
    b = response_messages(data[b_key], f"data.{b_key}")
    if result.get("type") == "pairwise":
        selected = value.get("selected")
        if selected not in ("left", "right"):
            raise Rejected("unknown_label", f"pairwise selected={str(selected)[:40]!r}; expected left or right")
        label = "a" if selected == "left" else "b"
    else:
        label = ab_label(value.get("choices"), "choices", (a_key,), (b_key,))
    out.votes.append(make_vote(ctx, prompt, a, b, label, annotator, origin=origin))


def parse_labelstudio(row: Any, ctx: Context) -> Parsed:
    row = require_object(row)
    if "data" not in row and "annotation_id" in row:
        row = _flat_task(row, ctx.question)
    data = row.get("data")
    if not isinstance(data, dict):
        raise Rejected("wrong_type", "task.data must be an object")
    annotations = row.get("annotations", row.get("completions"))
    if annotations is None:
        raise Rejected("no_annotations", "the task has no annotations")
    if not isinstance(annotations, list):
        raise Rejected("wrong_type", "task.annotations must be a list")
    if not annotations:
        raise Rejected("no_annotations", "the task has no annotations")
    prompt = prompt_messages(lookup(data, PROMPT_KEYS), "data.prompt")
    out = Parsed()
    for k, ann in enumerate(annotations, start=1):
        if not isinstance(ann, dict):
            out.dropped["wrong_type"] += 1
            continue
        origin = f"{ctx.origin} annotation {ann.get('id', k)}"
        if ann.get("was_cancelled") is True:
            out.dropped["cancelled"] += 1
            continue
        if not ann.get("result"):
            out.dropped["empty_annotation"] += 1
            continue
        if not isinstance(ann["result"], list):
            out.dropped["wrong_type"] += 1
            continue
        try:
            _annotation(ctx, prompt, data, ann, ctx.question, origin, out)
        except Rejected as e:
            out.dropped[e.reason] += 1
    return out
