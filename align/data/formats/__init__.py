"""The annotation formats `align import` reads: name -> how to recognise a row, how to parse it.

Each parser turns one raw row into a `Parsed` (votes, or rated responses to pair later) or raises
`Rejected(reason)`. `detect_format` picks the format from a file's rows when exactly one fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from align.data.formats.argilla import detect_argilla, parse_argilla
from align.data.formats.files import RawRow, read_rows
from align.data.formats.labelstudio import detect_labelstudio, parse_labelstudio
from align.data.formats.pairs import (
    detect_hh,
    detect_pairs,
    detect_pairs_ab,
    detect_shp,
    parse_hh,
    parse_pairs,
    parse_pairs_ab,
    parse_shp,
)
from align.data.formats.ranked import (
    detect_rankings,
    detect_scores,
    group_rated,
    parse_rankings,
    parse_scores,
)
from align.data.formats.votes import PAIR_POLICIES, Context, Parsed, Rated, Vote
from align.errors import DataError


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[dict], bool]
    parse: Callable[[Any, Context], Parsed]
    shape: str  # what a row looks like, for error messages


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pairs", detect_pairs, parse_pairs, "{prompt, chosen, rejected}"),
    Format("pairs_ab", detect_pairs_ab, parse_pairs_ab, "{prompt, response_a, response_b, preference: a|b|tie}"),
    Format("scores", detect_scores, parse_scores,
           "{prompt, response, score} per response, or {prompt, completions: [{response, score}]}"),
    Format("rankings", detect_rankings, parse_rankings,
           "{prompt, responses: [...], ranks: [...]} or {prompt, completions: [{response, rank}]}"),
    Format("labelstudio", detect_labelstudio, parse_labelstudio,
           "Label Studio JSON export: [{data: {...}, annotations: [{result: [...]}]}], or its JSON_MIN / CSV / TSV "
           "export: one row per annotation {<data keys>, <control>: answer, annotator, annotation_id, lead_time}"),
    Format("argilla", detect_argilla, parse_argilla,
           "Argilla records: {fields, responses} (v1/v2) or flattened {..., 'q.responses': [...]}"),
    Format("hh", detect_hh, parse_hh, "{chosen, rejected} '\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues"),
    Format("shp", detect_shp, parse_shp, "{history, human_ref_A, human_ref_B, labels, score_A, score_B}"),
)}

# canonical field names that `columns` may map to a file's own names (applied at the top level of each row and
# inside Label Studio `data` / Argilla `fields`); `preference` also names a Label Studio control or Argilla question
COLUMN_NAMES = ("prompt", "chosen", "rejected", "response_a", "response_b", "preference", "response", "score",
                "responses", "scores", "ranks", "completions", "annotator", "history", "human_ref_A",
                "human_ref_B", "labels")


def rename(row: Any, columns: dict[str, str]) -> Any:
    """Apply `columns` (canonical name -> the file's name) to a row, its `data` and its `fields`."""
    if not columns or not isinstance(row, dict):
        return row

    def apply(d: dict) -> dict:
        out = dict(d)
        for canonical, theirs in columns.items():
            if canonical == "preference" or theirs not in d:
                continue
            out.pop(theirs)
            out[canonical] = d[theirs]
        return out

    row = apply(row)
    for inner in ("data", "fields"):
        if isinstance(row.get(inner), dict):
            row[inner] = apply(row[inner])
    if "preference" in columns and columns["preference"] in row and "preference" not in row:
        row["preference"] = row[columns["preference"]]
    return row


def detect_format(rows: Sequence[RawRow], columns: dict[str, str], name: str) -> str:
    """The one format that fits at least half of the first 50 readable rows; else a DataError naming the
    candidates (or, if none fits, what each format looks like)."""
    sample = [rename(r.value, columns) for r in rows if r.error is None and isinstance(r.value, dict)][:50]
    if not sample:
        raise DataError(f"{name}: no readable JSON objects to detect the format from; every row is malformed")
    fits = {f.name: sum(1 for row in sample if f.detect(row)) for f in FORMATS.values()}
    candidates = [n for n, hits in fits.items() if hits and hits * 2 >= len(sample)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise DataError(f"{name}: the rows fit several formats ({', '.join(candidates)}); "
                        f"choose one with format={candidates[0]} (or another of them)")
    keys = sorted({str(k) for row in sample[:5] for k in row})[:20]
    shapes = "; ".join(f"{f.name}: {f.shape}" for f in FORMATS.values())
    raise DataError(f"{name}: cannot tell the format from the fields {', '.join(keys)}; rename fields with "
                    f"columns.<name>=<your field> or set format=... Formats: {shapes}")


__all__ = [
    "COLUMN_NAMES",
    "FORMATS",
    "PAIR_POLICIES",
    "Context",
    "Format",
    "Parsed",
    "Rated",
    "RawRow",
    "Vote",
    "detect_format",
    "group_rated",
    "read_rows",
    "rename",
]
