"""Read annotation files into raw rows: JSONL, JSON, CSV/TSV and Parquet.

A row that cannot even be parsed (bad JSON line, bytes that are not UTF-8) becomes a RawRow with `error` set,
so it is counted and rejected instead of stopping the import. Text is decoded with errors='surrogateescape'
so bad bytes survive into the row and the field checks reject that row alone.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.validate import Rejected, has_surrogates
from align.errors import DataError

EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
CONTAINER_KEYS = ("records", "data", "rows", "examples", "tasks", "items")


@dataclass
class RawRow:
    origin: str  # "file:line" (JSONL, CSV) or "file[index]" (JSON, Parquet; 1-based)
    value: Any
    error: Rejected | None = None


def read_rows(path: Path | str) -> list[RawRow]:
    """Every row of one annotation file, by its extension (or of an `hf:` dataset, see align/data/hub.py)."""
    if str(path).startswith("hf:"):
        from align.data.hub import hub_rows

        return [RawRow(f"{path}[{i}]", row) for i, row in enumerate(hub_rows(str(path)), start=1)]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (relative paths start at the repo root)")
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")
    if suffix == ".parquet":
        return parquet_rows(path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    if suffix in (".jsonl", ".ndjson"):
        return jsonl_rows(data, str(path))
    if suffix == ".json":
        return json_rows(data, str(path))
    first = data.split(b"\n", 1)[0]
    tabs = suffix == ".tsv" or (b"\t" in first and b"," not in first)  # Label Studio saves TSV as result.csv
    return csv_rows(data, str(path), delimiter="\t" if tabs else ",")


def jsonl_rows(data: bytes, name: str) -> list[RawRow]:
    """One row per non-blank line; a bad line is a rejected row, not an error."""
    rows = []
    for lineno, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(RawRow(origin, raw.decode("utf-8", "backslashreplace"),
                               Rejected("undecodable", f"byte {e.start} of the line is not UTF-8")))
            continue
        try:
            rows.append(RawRow(origin, json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as e:
            msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            rows.append(RawRow(origin, line, Rejected("invalid_json", msg)))
    return rows


def json_rows(data: bytes, name: str) -> list[RawRow]:
    """A JSON array of rows (or an object holding one under records/data/rows/examples/tasks/items)."""
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply to be annotation data; fix or export the file again") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            raise DataError(f"{name}:{e.lineno}: not valid JSON ({e.msg}); it looks like JSON Lines: "
                            f"rename it to .jsonl") from None
        raise DataError(f"{name}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                        f"fix the file or export it again") from None
    if isinstance(obj, dict):
        inner = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), list)]
        obj = obj[inner[0]] if inner else [obj]
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON array of records, got {type(obj).__name__}")
    return [RawRow(f"{name}[{i}]", v) for i, v in enumerate(obj, start=1)]


def _cell(value: str) -> Any:
    """CSV cells are text; a cell holding a JSON list or object (messages, responses, ranks) is parsed."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def csv_rows(data: bytes, name: str, delimiter: str = ",") -> list[RawRow]:
    """A header line, then one row per record; origin is the record's first line number."""
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise DataError(f"{name}: no CSV header line ({e})") from None
    rows = []
    line = reader.line_num + 1
    while True:
        origin = f"{name}:{line}"
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(RawRow(origin, None, Rejected("invalid_json", f"bad CSV: {e}")))
            line = reader.line_num + 1
            continue
        line = reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append(RawRow(origin, cells, Rejected("missing_field" if len(cells) < len(header) else "wrong_type",
                                                       f"{len(cells)} cells for {len(header)} columns")))
            continue
        row = {h: _cell(c) for h, c in zip(header, cells)}
        if any(has_surrogates(c) for c in cells):
            rows.append(RawRow(origin, row, Rejected("undecodable", "a cell has bytes that are not UTF-8")))
            continue
        rows.append(RawRow(origin, row))
    return rows


def _decode_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_bytes(v) for v in value]
    return value


def parquet_rows(path: Path) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [RawRow(f"{path}[{i}]", _decode_bytes(v)) for i, v in enumerate(table.to_pylist(), start=1)]
