"""Property tests: malformed and random rows never crash the importers, and every row read is accounted for
(accepted + rejected == read).

Rows are the real sample rows of data/human/ mutated by a fast seeded fuzzer (keys dropped, values replaced
by junk of every type, lists truncated, text corrupted), plus a few rows built by hypothesis from scratch;
hypothesis draws the seed, the format and the settings. 200 examples x ~60 rows > 10,000 rows.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.data.formats import FORMATS, RawRow, detect_format, read_rows
from align.data.formats.files import csv_rows, jsonl_rows
from align.data.importers import ImportSettings, import_rows
from align.data.validate import json_safe

HUMAN = Path(__file__).resolve().parent.parent / "data" / "human"
ROWS_PER_EXAMPLE = 60


def _samples() -> dict[str, list[Any]]:
    """format -> the sample rows of data/human/ in that format."""
    out: dict[str, list[Any]] = {name: [] for name in FORMATS}
    for path in sorted(HUMAN.glob("*.json*")):
        if path.name.startswith("demo_"):
            continue
        rows = read_rows(path)
        fmt = detect_format(rows, {}, path.name)
        out[fmt] += [r.value for r in rows if r.error is None]
    return out


SAMPLES = _samples()
ALL_SAMPLES = [row for rows in SAMPLES.values() for row in rows]
JUNK_VALUES = [None, "", " ", 0, -1, 1, 2, 3.5, float("nan"), float("inf"), True, False, [], {}, [None], "a", "b",
               "tie", "left", "right", "x" * 500, "bad \udc80 bytes", "submitted", "discarded", "response-1",
               [{"role": "user", "content": "hi"}], [{"role": "chef", "content": "hi"}], [{"content": 3}],
               [{"role": "assistant", "content": ""}], {"value": "response-2", "rank": 1}, ["a", "b", "c"],
               [1, 1], [[]], {"id": "a", "body": "text"}, "\n\nHuman: hi\n\nAssistant: ok"]


def junk(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(JUNK_VALUES))  # a fresh object: edits must not alias other rows


def _nodes(value: Any, out: list) -> list:
    """Every (container, key) pair inside a JSON value."""
    if isinstance(value, dict):
        for k in list(value):
            out.append((value, k))
            _nodes(value[k], out)
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((value, i))
            _nodes(value[i], out)
    return out


def mutate(row: Any, rng: random.Random) -> Any:
    """1-4 random edits of a deep copy of `row` (or the row unchanged, now and then)."""
    row = json.loads(json.dumps(row))
    for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
        nodes = _nodes(row, [])
        if not nodes:
            return rng.choice([junk(rng), row])
        parent, key = rng.choice(nodes)
        op = rng.randrange(6)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent[key], list):
            parent[key] = parent[key][: rng.randrange(len(parent[key]) + 1)]
        elif op == 2 and isinstance(parent[key], str):
            text = parent[key]
            cut = rng.randrange(len(text) + 1)
            parent[key] = text[:cut] + rng.choice(["", "\udc80", "\n\nHuman:", " Tip:", "\x00"]) + text[cut:]
        elif op == 3 and isinstance(parent, dict):
            other = rng.choice(list(parent))
            parent[key], parent[other] = parent[other], parent[key]
        else:
            parent[key] = junk(rng)
    return row


LEAF = st.none() | st.booleans() | st.integers(-2, 4) | st.floats() | st.sampled_from(["a", "tie", "", "left"])
JUNK = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "data", "annotations", "fields", "responses", "result"]),
    inner, max_size=4), max_leaves=6)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), extra=st.lists(JUNK, max_size=3), fmt=st.sampled_from(sorted(FORMATS)),
       pairs=st.sampled_from(["best_vs_worst", "best_vs_rest", "all"]),
       aggregate=st.sampled_from(["majority", "unanimous", "all"]), margin=st.sampled_from([0.0, 1.5]))
def test_random_rows_are_all_accounted_for(seed, extra, fmt, pairs, aggregate, margin):
    rng = random.Random(seed)
    own = SAMPLES[fmt]  # mostly rows of the format under test, so parsing gets deep; some of any other
    rows = [mutate(rng.choice(own if rng.random() < 0.8 else ALL_SAMPLES), rng)
            for _ in range(ROWS_PER_EXAMPLE)] + extra
    raw = [RawRow(f"x.jsonl:{i}", row) for i, row in enumerate(rows, start=1)]
    settings_ = ImportSettings(format=fmt, pairs=pairs, aggregate=aggregate, min_margin=margin, max_length=60)
    measure = lambda prompt, response: sum(len(m["content"]) for m in prompt + response) // 4
    result = import_rows([("x.jsonl", raw)], settings_, measure)
    rejected = sum(result.rejected_by_reason().values())
    assert result.accepted + rejected == len(rows)
    assert len(result.rejects()) == rejected
    for rec in result.records:
        assert rec.chosen != rec.rejected and rec.meta["source"] == "human"
        json.dumps(json_safe(rec.to_json()), ensure_ascii=False).encode("utf-8")  # writable as UTF-8
    for r in result.rejects():
        json.dumps(r, ensure_ascii=False, allow_nan=False).encode("utf-8")


def corrupt(line: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return line
    at = rng.randrange(len(line) + 1)
    return line[:at] + rng.choice([b"\xff", b"\xe8", b"{", b'"', b",", b"", b"\\u", b"\r"]) + line[at + 1:]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(["pairs", "pairs_ab", "scores", "hh", "shp"]))
def test_random_bytes_through_the_file_readers(seed, fmt):
    rng = random.Random(seed)
    lines = [corrupt(json.dumps(json_safe(mutate(rng.choice(SAMPLES[fmt] + ALL_SAMPLES[:5]), rng))).encode(), rng)
             for _ in range(ROWS_PER_EXAMPLE)]
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    rows = jsonl_rows(data, "x.jsonl")
    assert len(rows) == sum(1 for line in data.split(b"\n") if line.strip())
    result = import_rows([("x.jsonl", rows)], ImportSettings(format=fmt))
    assert result.accepted + sum(result.rejected_by_reason().values()) == len(rows)
    header = b"prompt,chosen,rejected,response_a,response_b,preference\n"
    table = csv_rows(header + data, "x.csv")
    result = import_rows([("x.csv", table)], ImportSettings(format=fmt))
    assert result.accepted + sum(result.rejected_by_reason().values()) == len(table)
