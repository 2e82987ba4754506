"""Human preference labels in any supported format -> canonical preference records, with a ledger that accounts
for every row read (accepted, or rejected with a reason) and every label (used, or dropped with a reason).

Pipeline: read rows -> parse each row into votes (one annotator's verdict on one response pair) -> pair
one-row-per-response scores -> with `tasks` (from `align label`): map votes back to their task's exact prompt
and responses, score annotators on gold tasks, drop annotators below min_gold_accuracy -> drop exact duplicate
labels -> group votes by (prompt, unordered pair) -> aggregate each group (majority | unanimous | all) -> drop
records longer than max_length -> records.
A row is *rejected* when it failed to parse or validate, or when it produced no label that reached a record
(all cancelled, tie, no majority, duplicate, too long...); otherwise it is *accepted*, whether it gave one pair,
several (rankings) or, like a middle response under pairs=best_vs_worst, none of its own. A row labelling a
gold task is accepted too: its labels score the annotator instead of becoming pairs.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from align.data.agreement import AGGREGATES, aggregate_label, agreement_report
from align.data.formats import (
    COLUMN_NAMES,
    FORMATS,
    PAIR_POLICIES,
    Context,
    Parsed,
    RawRow,
    Vote,
    detect_format,
    group_rated,
    read_rows,
    rename,
)
from align.data.labeling import Task, gold_report
from align.data.records import Message, PreferenceRecord
from align.data.validate import Rejected, json_safe
from align.errors import ConfigError

Measure = Callable[[list[Message], list[Message]], int]  # (prompt, response) -> tokens


@dataclass(frozen=True)
class ImportSettings:
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    pairs: str = "best_vs_worst"
    min_margin: float = 0.0
    aggregate: str = "majority"
    max_length: int = 0  # tokens of prompt + response; 0: no limit
    tasks: Mapping[str, Task] = field(default_factory=dict)  # `align label` tasks by task_id
    min_gold_accuracy: float = 0.0  # drop annotators whose accuracy on gold tasks is below this

    def check(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}: use auto or one of {', '.join(FORMATS)}")
        if self.pairs not in PAIR_POLICIES:
            raise ConfigError(f"pairs={self.pairs!r}: use one of {', '.join(PAIR_POLICIES)}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate={self.aggregate!r}: use one of {', '.join(AGGREGATES)}")
        unknown = sorted(set(self.columns) - set(COLUMN_NAMES))
        if unknown:
            raise ConfigError(f"columns: unknown canonical name(s) {', '.join(unknown)}; map these to your "
                              f"file's fields: {', '.join(COLUMN_NAMES)}")
        if self.min_margin < 0:
            raise ConfigError(f"min_margin={self.min_margin} must be >= 0")
        if not 0 <= self.min_gold_accuracy <= 1:
            raise ConfigError(f"min_gold_accuracy={self.min_gold_accuracy} must be in [0, 1]")
        if self.min_gold_accuracy > 0 and not self.tasks:
            raise ConfigError("min_gold_accuracy needs tasks=<the align label run> to know the gold answers")


@dataclass
class RowOutcome:
    """One row read: its origin, raw value (for rejects.jsonl) and what became of it."""

    origin: str
    raw: Any
    format: str
    reason: str | None = None  # set when the row itself is rejected
    detail: str = ""
    used: bool = False  # some label of the row is in an accepted record
    drops: list[tuple[str, str]] = field(default_factory=list)  # labels of the row dropped later

    @property
    def rejected(self) -> tuple[str, str] | None:
        if self.reason is not None:
            return self.reason, self.detail
        if not self.used and self.drops:
            return self.drops[0]
        return None


@dataclass
class ImportResult:
    records: list[PreferenceRecord]
    rows: list[RowOutcome]
    formats: dict[str, str]  # file -> format
    labels: Counter  # used + dropped-by-reason counts of labels ("used" key for used)
    units: list[list[tuple[str | None, str]]]  # (annotator, label) per (prompt, pair) unit, for agreement
    group_drops: Counter  # units (or votes, aggregate=all) dropped: tie / no_majority / not_unanimous / too_long
    lengths: list[dict[str, int]]  # per accepted record: chars and, with a tokenizer, tokens
    gold: dict[str, dict[str, Any]] = field(default_factory=dict)  # annotator -> accuracy on gold tasks

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.rows if r.rejected is None)

    def rejected_by_reason(self) -> Counter:
        return Counter(r.rejected[0] for r in self.rows if r.rejected is not None)

    def rejects(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rows:
            if r.rejected is not None:
                reason, detail = r.rejected
                out.append(json_safe({"reason": reason, "detail": detail, "origin": r.origin, "format": r.format,
                                      "row": r.raw}))
        return out

    def agreement(self) -> dict[str, Any]:
        report = agreement_report(self.units)
        report["ties_dropped"] = self.group_drops["tie"]
        report["disagreements_dropped"] = self.group_drops["no_majority"] + self.group_drops["not_unanimous"]
        return report


def _key(messages: Sequence[Message]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _oriented(vote: Vote) -> tuple[tuple[str, str, str], Vote]:
    """(unit key, vote with a/b in the unit's fixed order) so labels of one pair are comparable."""
    ka, kb = _key(vote.a), _key(vote.b)
    if ka > kb:
        flipped = {"a": "b", "b": "a", "tie": "tie"}[vote.label]
        scores = (vote.scores[1], vote.scores[0]) if vote.scores else None
        vote = replace(vote, a=vote.b, b=vote.a, label=flipped, scores=scores)
        ka, kb = kb, ka
    return (_key(vote.prompt), ka, kb), vote


def parse_rows(raw_rows: list[RawRow], fmt: str, settings: ImportSettings, ledger: list[RowOutcome],
               labels: Counter) -> tuple[list[Vote], list[list[int]]]:
    """Parse rows of one format into votes, appending each row to the ledger. Also returns the row groups of
    one-row-per-response scores (rows that share one prompt and annotator share their fate)."""
    parse = FORMATS[fmt].parse
    question = settings.columns.get("preference")
    votes, rated = [], []
    for raw in raw_rows:
        outcome = RowOutcome(raw.origin, raw.value, fmt)
        ledger.append(outcome)
        if raw.error is not None:
            outcome.reason, outcome.detail = raw.error.reason, raw.error.detail
            continue
        ctx = Context(len(ledger) - 1, raw.origin, settings.pairs, settings.min_margin, question)
        try:
            parsed: Parsed = parse(rename(raw.value, settings.columns), ctx)
        except Rejected as e:
            outcome.reason, outcome.detail = e.reason, e.detail
            continue
        labels.update(parsed.dropped)
        tid = row_task_id(raw.value)
        for vote in parsed.votes if tid is not None else ():
            vote.extra["task_id"] = tid
        if not parsed.votes and not parsed.rated:
            outcome.reason = parsed.dropped.most_common(1)[0][0] if parsed.dropped else "no_annotations"
            outcome.detail = "no usable label: " + ", ".join(f"{k} {n}" for k, n in parsed.dropped.most_common())
        votes += parsed.votes
        rated += parsed.rated
    groups: list[list[int]] = []
    if rated:
        parsed_groups, failed = group_rated(rated, settings.pairs, settings.min_margin)
        for group, rows in parsed_groups:
            labels.update(group.dropped)
            votes += group.votes
            groups.append(rows)
        for row, reason in failed.items():
            if ledger[row].reason is None:
                ledger[row].reason, ledger[row].detail = reason, "no pair could be formed for this prompt"
    return votes, groups


def share_fate(ledger: list[RowOutcome], groups: Sequence[list[int]]) -> None:
    """Rows of one scored group that no pair used (e.g. middle responses under best_vs_worst) follow the
    group: accepted if any member is in a record, else rejected with a member's reason."""
    for rows in groups:
        if any(ledger[r].used for r in rows):
            for r in rows:
                ledger[r].used = ledger[r].reason is None
            continue
        drops = next((ledger[r].drops[0] for r in rows if ledger[r].drops), None)
        for r in rows:
            if drops is not None and not ledger[r].drops and ledger[r].reason is None:
                ledger[r].drops.append(drops)


def _drop(ledger: list[RowOutcome], votes: Sequence[Vote], reason: str, detail: str, labels: Counter) -> None:
    labels[reason] += len(votes)
    for v in votes:
        for row in v.rows:
            ledger[row].drops.append((reason, detail))


def row_task_id(row: Any) -> str | None:
    """The `align label` task id a row carries (top level, Label Studio data, Argilla metadata), if any."""
    if not isinstance(row, dict):
        return None
    for holder in (row, row.get("data"), row.get("metadata")):
        if isinstance(holder, dict) and isinstance(holder.get("task_id"), (str, int)) and holder["task_id"] != "":
            return str(holder["task_id"])
    return None


def _slot(task: Task, response: list[Message]) -> int | None:
    """Index of the task response that `response` shows (exactly, else up to surrounding whitespace)."""
    if len(response) != 1:
        return None
    text = response[0]["content"]
    for same in (lambda r: r == text, lambda r: r.strip() == text.strip()):
        hits = [i for i, r in enumerate(task.responses) if same(r)]
        if len(hits) == 1:
            return hits[0]
    return None


def apply_tasks(votes: list[Vote], settings: ImportSettings, ledger: list[RowOutcome],
                labels: Counter) -> tuple[list[Vote], dict[str, dict[str, Any]]]:
    """Votes naming a task get its exact prompt and responses (unknown task or other texts: dropped); votes on
    gold tasks score their annotators and leave; annotators below min_gold_accuracy lose every vote.
    Returns (the votes kept, the per-annotator gold report)."""
    if not settings.tasks:
        return votes, {}
    kept, answers = [], []
    for vote in votes:
        tid = vote.extra.get("task_id")
        if tid is None:
            kept.append(vote)
            continue
        task = settings.tasks.get(tid)
        if task is None:
            _drop(ledger, [vote], "unknown_task", f"task {tid} is not in tasks=; give the label run it came from",
                  labels)
            continue
        i, j = _slot(task, vote.a), _slot(task, vote.b)
        if i is None or j is None:
            _drop(ledger, [vote], "task_mismatch", f"the responses differ from those of task {tid}", labels)
            continue
        a, b = task.responses[i], task.responses[j]
        vote = replace(vote, prompt=task.prompt, a=[{"role": "assistant", "content": a}],
                       b=[{"role": "assistant", "content": b}])
        if task.gold is None:
            kept.append(vote)
            continue
        answers.append((vote.annotator, {"a": i, "b": j}.get(vote.label) == task.gold))
        for row in vote.rows:
            ledger[row].used = True
    report = gold_report(answers, settings.min_gold_accuracy)
    low = {who for who, r in report.items() if r["dropped"]}
    out = []
    for vote in kept:
        if (vote.annotator or "") in low:
            acc = report[vote.annotator or ""]["accuracy"]
            _drop(ledger, [vote], "low_gold_accuracy", f"annotator {vote.annotator} scored {acc} on gold tasks < "
                                                       f"min_gold_accuracy={settings.min_gold_accuracy}", labels)
        else:
            out.append(vote)
    return out, report


def _record(votes: Sequence[Vote], winner: str, ledger: list[RowOutcome]) -> PreferenceRecord:
    """One canonical record from the votes of one unit (all in the unit's orientation)."""
    first = votes[0]
    chosen, rejected = (first.a, first.b) if winner == "a" else (first.b, first.a)
    origins = list(dict.fromkeys(v.origin for v in votes))
    meta: dict[str, Any] = {"source": "human", "format": ledger[first.rows[0]].format,
                            "annotators": sorted({v.annotator for v in votes if v.annotator is not None}),
                            "origin": origins[0]}
    if "task_id" in first.extra:
        meta["task_id"] = first.extra["task_id"]
    if len(origins) > 1:
        meta["origins"] = origins
    if len(votes) > 1:
        counts = Counter(v.label for v in votes)
        loser = "b" if winner == "a" else "a"
        meta["votes"] = {"chosen": counts[winner], "rejected": counts[loser], "tie": counts["tie"]}
        meta["agreement"] = round(counts[winner] / len(votes), 4)
    scored = [v.scores for v in votes if v.scores is not None]
    if scored:
        s_a, s_b = statistics.fmean(s[0] for s in scored), statistics.fmean(s[1] for s in scored)
        s_c, s_r = (s_a, s_b) if winner == "a" else (s_b, s_a)
        meta["scores"] = {"chosen": s_c, "rejected": s_r}
        meta["margin"] = s_c - s_r
    margins = [v.extra["margin"] for v in votes if "margin" in v.extra]
    if margins:
        meta["margin"] = statistics.fmean(margins)
    return PreferenceRecord(prompt=first.prompt, chosen=chosen, rejected=rejected, meta=meta)


def build_records(votes: list[Vote], settings: ImportSettings, ledger: list[RowOutcome], labels: Counter,
                  measure: Measure | None) -> tuple[list[PreferenceRecord], list[list[tuple[str | None, str]]],
                                                     Counter, list[dict[str, int]]]:
    """Dedupe, group, aggregate and length-check votes; returns (records, agreement units, drops, lengths)."""
    units: dict[tuple[str, str, str], list[Vote]] = defaultdict(list)
    seen: set[tuple] = set()
    for vote in votes:
        key, vote = _oriented(vote)
        ident = (*key, vote.label, vote.annotator)
        if ident in seen:
            _drop(ledger, [vote], "duplicate", "the same label appears earlier", labels)
            continue
        seen.add(ident)
        units[key].append(vote)
    group_drops: Counter = Counter()
    candidates: list[tuple[list[Vote], str]] = []
    for members in units.values():
        if settings.aggregate == "all":
            for v in members:
                if v.label == "tie":
                    group_drops["tie"] += 1
                    _drop(ledger, [v], "tie", "the label is a tie", labels)
                else:
                    candidates.append(([v], v.label))
            continue
        winner, reason = aggregate_label([v.label for v in members], settings.aggregate)
        if winner is None:
            group_drops[reason] += 1
            n = Counter(v.label for v in members)
            _drop(ledger, members, reason, f"{len(members)} label(s) of this pair: {n['a']} for one response, "
                                           f"{n['b']} for the other, {n['tie']} tie", labels)
        else:
            candidates.append((members, winner))
    records, lengths = [], []
    for members, winner in candidates:
        record = _record(members, winner, ledger)
        size = _lengths(record, measure)
        longest = max(size.get("chosen_tokens", 0), size.get("rejected_tokens", 0))
        if settings.max_length and measure is not None and longest > settings.max_length:
            group_drops["too_long"] += 1
            _drop(ledger, members, "too_long", f"{longest} tokens > max_length={settings.max_length}", labels)
            continue
        labels["used"] += len(members)
        for v in members:
            for row in v.rows:
                ledger[row].used = True
        records.append(record)
        lengths.append(size)
    return records, [[(v.annotator, v.label) for v in m] for m in units.values()], group_drops, lengths


def _lengths(record: PreferenceRecord, measure: Measure | None) -> dict[str, int]:
    size = {"prompt_chars": sum(len(m["content"]) for m in record.prompt),
            "chosen_chars": sum(len(m["content"]) for m in record.chosen),
            "rejected_chars": sum(len(m["content"]) for m in record.rejected)}
    if measure is not None:
        size["chosen_tokens"] = measure(record.prompt, record.chosen)
        size["rejected_tokens"] = measure(record.prompt, record.rejected)
    return size


def import_rows(sources: Sequence[tuple[str, list[RawRow]]], settings: ImportSettings,
                measure: Measure | None = None) -> ImportResult:
    """Import already-read rows: `sources` is [(file name, rows)]; the format is detected per file."""
    settings.check()
    ledger: list[RowOutcome] = []
    labels: Counter = Counter()
    formats: dict[str, str] = {}
    votes: list[Vote] = []
    groups: list[list[int]] = []
    for name, raw_rows in sources:
        fmt = settings.format if settings.format != "auto" else detect_format(raw_rows, settings.columns, name)
        formats[name] = fmt
        file_votes, file_groups = parse_rows(raw_rows, fmt, settings, ledger, labels)
        votes += file_votes
        groups += file_groups
    votes, gold = apply_tasks(votes, settings, ledger, labels)
    records, units, group_drops, lengths = build_records(votes, settings, ledger, labels, measure)
    share_fate(ledger, groups)
    return ImportResult(records, ledger, formats, labels, units, group_drops, lengths, gold)


def import_files(paths: Sequence[Path | str], settings: ImportSettings,
                 measure: Measure | None = None) -> ImportResult:
    """Read and import annotation files (JSONL, JSON, CSV/TSV, Parquet)."""
    return import_rows([(str(p), read_rows(p)) for p in paths], settings, measure)


def split_by_prompt(records: Sequence[PreferenceRecord], fraction: float,
                    seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Deterministic train/validation split by prompt: every record of one prompt lands on the same side.

    round(fraction * n_prompts) prompts (at least 1 when fraction > 0 and there are >= 2 prompts, and never
    all of them) are drawn with `seed` from the sorted prompt keys; records keep their order.
    """
    prompts = sorted({_key(r.prompt) for r in records})
    n_val = round(fraction * len(prompts))
    if fraction > 0 and len(prompts) >= 2:
        n_val = min(max(1, n_val), len(prompts) - 1)
    else:
        n_val = 0
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:n_val])
    train = [r for r in records if _key(r.prompt) not in held]
    valid = [r for r in records if _key(r.prompt) in held]
    return train, valid


def length_stats(lengths: Sequence[dict[str, int]]) -> dict[str, dict[str, float]]:
    """min / mean / p95 / max of each measured length."""
    out = {}
    for name in (lengths[0] if lengths else {}):
        values = sorted(size[name] for size in lengths)
        out[name] = {"min": values[0], "mean": round(statistics.fmean(values), 1),
                     "p95": values[min(len(values) - 1, int(0.95 * len(values)))], "max": values[-1]}
    return out
