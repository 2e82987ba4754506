"""Round trips: `align label` -> simulated annotations in every export format -> `align import tasks=...` ->
exactly the expected pairs and annotator ids; gold accuracy equals the hand-computed value.

The JSON_MIN / CSV / TSV files are made here by `ls_flat` / `ls_csv`, a small copy of what Label Studio's
converter does for these templates; `test_simulated_exports_match_label_studios_converter` checks that copy
against the converter's own output (tests/fixtures/labelstudio, made by make_fixtures.py), and
`test_converter_made_roundtrip_imports_exactly` imports the converter's files themselves.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from align.data.importers import ImportResult, ImportSettings, import_files
from align.errors import ConfigError
from align.stages import import_prefs, label

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "labelstudio"
HUMAN = Path(__file__).resolve().parent.parent / "data" / "human"


# ---- simulated annotators -----------------------------------------------------------------------------------

def tip_first(texts: list[str]) -> list[int]:
    """Annotators 1 and 7: the answer with a 'Tip:' first, then the longer. Returns indices best first."""
    return sorted(range(len(texts)), key=lambda i: ("Tip:" in texts[i], len(texts[i])), reverse=True)


def shortest_first(texts: list[str]) -> list[int]:
    """Annotator 2: the shorter answer first."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


ANNOTATORS = {1: tip_first, 2: shortest_first, 7: tip_first}


# ---- Label Studio: the JSON export, and what its converter makes of it ------------------------------------

def ls_json_export(tasks: list[dict], skip: tuple[int, ...] = ()) -> list[dict]:
    """A Label Studio JSON export of `labelstudio_tasks.json` answered by ANNOTATORS (tasks at `skip`: none)."""
    out, ann_id = [], 0
    for i, task in enumerate(tasks, start=1):
        data = task["data"]
        annotations = []
        for who, rank in ANNOTATORS.items() if i - 1 not in skip else ():
            ann_id += 1
            if "items" in data:
                order = rank([it["body"] for it in data["items"]])
                result = {"from_name": "rank", "to_name": "answers", "type": "ranker",
                          "value": {"ranker": {"answers": [data["items"][k]["id"] for k in order]}}}
            else:
                best = rank([data["answer1"], data["answer2"]])[0]
                result = {"from_name": "comparison", "to_name": "answer1,answer2", "type": "pairwise",
                          "value": {"selected": "left" if best == 0 else "right"}}
            annotations.append({"id": ann_id, "completed_by": who, "was_cancelled": False, "result": [result],
                                "created_at": f"2026-11-20T10:00:{ann_id:02d}Z", "lead_time": 3.5, "task": i})
        out.append({"id": i, "data": data, "annotations": annotations, "predictions": []})
    return out


CONTROL_TYPES = {"pairwise": "Pairwise", "ranker": "Ranker", "choices": "Choices"}


def ls_flat(export: list[dict]) -> list[dict]:
    """JSON_MIN rows, as label_studio_sdk.converter writes them: one per live annotation (newest first), the data
    keys at the top level, each control's value under its name; one row for a task without annotations."""
    rows = []
    for task in export:
        live = [a for a in task["annotations"] if not a.get("was_cancelled")]
        if task["annotations"] and not live:
            continue
        for ann in sorted(live, key=lambda a: a.get("created_at", 0), reverse=True) or [None]:
            row = {**task["data"], "id": task["id"]}
            for r in (ann or {}).get("result", []):
                value = r["value"]
                single = r["type"] == "choices" and len(value["choices"]) == 1
                row[r["from_name"]] = value["choices"][0] if single else [value]
            who = (ann or {}).get("completed_by", {})
            row.update(annotator=who.get("email") if isinstance(who, dict) else who,
                       annotation_id=ann and ann["id"], created_at=ann and ann.get("created_at"),
                       updated_at=ann and ann.get("updated_at"), lead_time=ann and ann.get("lead_time"))
            rows.append(row)
    return rows


def ls_csv(export: list[dict], sep: str) -> str:
    """CSV / TSV as the converter writes them: sorted columns, strings quoted, lists and dicts as JSON text."""
    rows = ls_flat(export)
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (list, dict)):
                row[k] = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        row["annotator"] = None if row["annotator"] is None else str(row["annotator"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=sorted({k for r in rows for k in r}), quoting=csv.QUOTE_NONNUMERIC,
                            delimiter=sep)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_ls_exports(export: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"export.json": json.dumps(export), "export_min.json": json.dumps(ls_flat(export)),
             "export.csv": ls_csv(export, ","), "export.tsv": ls_csv(export, "\t")}
    for name, text in files.items():
        (folder / name).write_text(text)
    return [folder / name for name in files]


def cells(text: str, sep: str) -> list[dict]:
    parse = lambda v: json.loads(v) if v[:1] in ("[", "{") else v
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text), delimiter=sep)]


def test_simulated_exports_match_label_studios_converter():
    for name in ("pairwise", "ranker", "choices"):
        export = json.loads((HUMAN / f"labelstudio_{name}.json").read_text())
        assert ls_flat(export) == json.loads((FIXTURES / f"{name}.json_min.json").read_text()), name
        for sep, ext in ((",", "csv"), ("\t", "tsv")):
            assert cells(ls_csv(export, sep), sep) == cells((FIXTURES / f"{name}.{ext}").read_text(), sep), name


# ---- the round trips ----------------------------------------------------------------------------------------

def labelled(tmp_path: Path, **over) -> Path:
    over.setdefault("inputs", [str(FIXTURES / "samples.jsonl")])
    over.setdefault("gold", str(FIXTURES / "gold.jsonl"))
    # gold_rate 0.7 of 3 or 5 selected tasks asks for more gold than the 4 known answers: all 4 come in
    return label.run(label.Config(output_dir=str(tmp_path / "label"), gold_rate=0.7, budget=0, **over))


def tasks_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]


def expected(tasks: list[dict], annotators: list[str], skip: set[str] = frozenset()) -> set[tuple]:
    """(prompt, chosen, rejected, annotators) per non-gold task: the majority (annotators 1 and 7) picks
    tip_first's best; with k > 2 responses the pair is best vs worst."""
    out = set()
    for t in tasks:
        if t["gold"] is None and t["task_id"] not in skip:
            order = tip_first(t["responses"])
            out.add((json.dumps(t["prompt"]), t["responses"][order[0]], t["responses"][order[-1]],
                     tuple(annotators)))
    return out


def got(result: ImportResult) -> set[tuple]:
    return {(json.dumps(r.prompt), r.chosen[0]["content"], r.rejected[0]["content"], tuple(r.meta["annotators"]))
            for r in result.records}


def load(tasks_file: Path, files: list[Path], **settings) -> list[ImportResult]:
    tasks = import_prefs.read_tasks(tasks_file)
    return [import_files([f], ImportSettings(tasks=tasks, **settings)) for f in files]


# hand-computed from gold.jsonl: three gold answers carry a tip and are the longer one, the fourth (the egg) is
# the shorter one without a tip. tip_first (1, 7) gets 3 of 4 right, shortest_first (2) 1 of 4.
GOLD = {"1": {"gold_labels": 4, "correct": 3, "accuracy": 0.75, "dropped": False},
        "2": {"gold_labels": 4, "correct": 1, "accuracy": 0.25, "dropped": False},
        "7": {"gold_labels": 4, "correct": 3, "accuracy": 0.75, "dropped": False}}
DROP_2 = {**GOLD, "2": {**GOLD["2"], "dropped": True}}


def test_labelstudio_every_export_format_round_trips(tmp_path):
    run = labelled(tmp_path)
    tasks = tasks_of(run)
    export = ls_json_export(json.loads((run / "labelstudio_tasks.json").read_text()))
    files = write_ls_exports(export, tmp_path / "exports")
    want = expected(tasks, ["1", "2", "7"])
    assert len(want) == 5
    for f, result in zip(files, load(run / "tasks.jsonl", files)):
        assert result.formats == {str(f): "labelstudio"}
        assert got(result) == want, f.name
        assert result.gold == GOLD, f.name
        assert {r.meta["task_id"] for r in result.records} == {t["task_id"] for t in tasks if t["gold"] is None}
        # 1 and 7 outvote 2, except on rice, where the answer with the tip is also the shorter one
        assert sorted(r.meta["votes"]["chosen"] for r in result.records) == [2, 2, 2, 2, 3]
        salt = next(r for r in result.records if "salt" in r.prompt[-1]["content"])
        assert salt.prompt == [{"role": "system", "content": "Answer in one or two sentences."},
                               {"role": "user", "content": "How much salt goes in pasta water?"}]  # mapped back
        assert result.accepted == len(result.rows)  # gold rows count as used
    for f, result in zip(files, load(run / "tasks.jsonl", files, min_gold_accuracy=0.5)):
        assert got(result) == expected(tasks, ["1", "7"]) and result.gold == DROP_2, f.name
        assert result.labels["low_gold_accuracy"] == 5  # annotator 2's label on each non-gold task


def test_without_tasks_the_labels_still_import_but_gold_is_not_known(tmp_path):
    run = labelled(tmp_path)
    export = ls_json_export(json.loads((run / "labelstudio_tasks.json").read_text()))
    result = import_files([write_ls_exports(export, tmp_path / "x")[2]], ImportSettings())
    assert len(result.records) == 9 and result.gold == {}  # gold pairs come in as plain pairs
    salt = next(r for r in result.records if "salt" in r.prompt[-1]["content"])
    assert salt.prompt == [{"role": "user", "content": "system: Answer in one or two sentences.\n\n"
                                                       "user: How much salt goes in pasta water?"}]


def test_labelstudio_ranker_round_trips(tmp_path):
    run = labelled(tmp_path, compare="all", gold="")
    tasks = tasks_of(run)
    assert sorted(len(t["responses"]) for t in tasks) == [2, 2, 3]
    export = ls_json_export(json.loads((run / "labelstudio_tasks.json").read_text()), skip=(0,))
    files = write_ls_exports(export, tmp_path / "exports")
    want = expected(tasks, ["1", "2", "7"], skip={tasks[0]["task_id"]})
    for f, result in zip(files, load(run / "tasks.jsonl", files)):
        assert got(result) == want, f.name
        assert result.rejected_by_reason() == {"no_annotations": 1}, f.name


def argilla_exports(run: Path, folder: Path) -> list[Path]:
    """What `dataset.records.to_list(flatten=True)` and `to_list()` give after ANNOTATORS answered each record."""
    users = {who: f"00000000-0000-0000-0000-{who:012d}" for who in ANNOTATORS}
    settings = json.loads((run / "argilla_settings.json").read_text())
    names = [f["name"] for f in settings["fields"] if f["name"].startswith("response-")]
    flat, nested = [], []
    for rec in json.loads((run / "argilla_records.json").read_text()):
        fields = {"prompt": rec["prompt"], **{n: rec.get(n) for n in names}}
        present = [n for n in names if fields[n] is not None]
        rankings = {who: [present[i] for i in rank([fields[n] for n in present])] for who, rank in ANNOTATORS.items()}
        flat.append({"id": rec["id"], "status": "completed", "_server_id": "srv", **fields,
                     "task_id": rec["task_id"], "prompt_id": rec["prompt_id"],
                     "ranking.responses": list(rankings.values()),
                     "ranking.responses.users": [users[w] for w in rankings],
                     "ranking.responses.status": ["submitted"] * len(rankings)})
        nested.append({"id": rec["id"], "fields": {k: v for k, v in fields.items() if v is not None},
                       "metadata": {"task_id": rec["task_id"], "prompt_id": rec["prompt_id"]}, "suggestions": {},
                       "responses": {"ranking": [{"value": v, "user_id": users[w]} for w, v in rankings.items()]},
                       "vectors": {}, "status": "completed", "_server_id": "srv"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flat.json").write_text(json.dumps(flat))
    (folder / "nested.json").write_text(json.dumps(nested))
    return [folder / "flat.json", folder / "nested.json"]


@pytest.mark.parametrize("compare", ["pairs", "all"])
def test_argilla_round_trips(tmp_path, compare):
    run = labelled(tmp_path, tool="argilla", compare=compare)
    tasks = tasks_of(run)
    files = argilla_exports(run, tmp_path / "exports")
    uuid = lambda who: f"00000000-0000-0000-0000-{who:012d}"
    for f, result in zip(files, load(run / "tasks.jsonl", files)):
        assert result.formats == {str(f): "argilla"}
        assert got(result) == expected(tasks, [uuid(1), uuid(2), uuid(7)]), f.name
        assert result.gold == {uuid(int(k)): v for k, v in GOLD.items()}, f.name


def test_plain_csv_and_jsonl_round_trip(tmp_path):
    for tool, name in (("csv", "to_label.csv"), ("jsonl", "to_label.jsonl")):
        run = labelled(tmp_path / tool, tool=tool)
        tasks = {t["task_id"]: t for t in tasks_of(run)}
        if tool == "csv":
            with open(run / name, newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        filled = []
        for row in rows:
            for who, rank in ANNOTATORS.items():
                best = rank([row["response_a"], row["response_b"]])[0]
                filled.append({**row, "preference": "ab"[best], "annotator": str(who)})
        out = tmp_path / tool / f"done.{tool}"
        if tool == "csv":
            with open(out, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(filled[0]))
                writer.writeheader()
                writer.writerows(filled)
        else:
            out.write_text("".join(json.dumps(r) + "\n" for r in filled))
        (result,) = load(run / "tasks.jsonl", [out])
        assert result.formats == {str(out): "pairs_ab"}
        assert got(result) == expected(list(tasks.values()), ["1", "2", "7"]) and result.gold == GOLD, tool


def test_converter_made_roundtrip_imports_exactly():
    """The fixtures Label Studio's converter and Argilla's SDK made from an `align label` export (make_fixtures.py):
    annotators 1 (tip_first) and 2 (shortest_first); a cancelled annotation, an empty one, a task with none."""
    tasks = [json.loads(line) for line in (FIXTURES / "roundtrip_tasks.jsonl").read_text().splitlines()]
    plain = [t for t in tasks if t["gold"] is None]
    rice = next(t for t in plain if "rice" in t["prompt"][-1]["content"])  # no annotations in Label Studio
    one = {"1": GOLD["1"], "2": {**GOLD["2"], "dropped": True}}
    uuid = lambda who: f"00000000-0000-0000-0000-{who:012d}"
    for name in ("roundtrip.json", "roundtrip.json_min.json", "roundtrip.csv", "roundtrip.tsv",
                 "argilla_flat.json", "argilla_nested.json"):
        ls = name.startswith("roundtrip")
        ids = (lambda w: w) if ls else (lambda w: uuid(int(w)))
        tasks_file, export = FIXTURES / "roundtrip_tasks.jsonl", [FIXTURES / name]
        all_votes, only_1 = load(tasks_file, export) + load(tasks_file, export, min_gold_accuracy=0.5)
        assert all_votes.gold == {ids(k): {**v, "dropped": False} for k, v in one.items()}, name
        assert only_1.gold == {ids(k): v for k, v in one.items()}, name
        # 1 and 2 disagree on every non-gold pair; without 2, 1's choices remain
        want = expected(plain, [ids("1")], skip={rice["task_id"]} if ls else set())
        assert got(only_1) == want, name
        if ls:
            # the only pair with one label: annotator 2 left the second non-gold task empty
            assert got(all_votes) == expected([plain[1]], ["1"]), name
            assert all_votes.labels["empty_annotation"] == 1
            assert all_votes.labels["cancelled"] == (1 if name == "roundtrip.json" else 0)  # flat exports omit it
        else:
            # rice: both prefer the answer with the tip (it is also the shorter); every other pair is split
            assert got(all_votes) == expected([rice], [ids("1"), ids("2")])
            assert all_votes.labels["no_majority"] == 2 * (len(plain) - 1)


def test_cli_label_then_import_with_tasks_and_min_gold_accuracy(tmp_path, capsys):
    from align.cli import main

    out = tmp_path / "label"
    assert main(["label", str(FIXTURES / "samples.jsonl"), f"gold={FIXTURES / 'gold.jsonl'}", "gold_rate=0.7",
                 "budget=0", f"output_dir={out}"]) == 0
    export = ls_json_export(json.loads((out / "labelstudio_tasks.json").read_text()))
    csv_file = write_ls_exports(export, tmp_path / "exports")[2]
    cfg = import_prefs.Config(inputs=[str(csv_file)], tasks=str(out), min_gold_accuracy=0.5, max_length=0,
                              validation_fraction=0.0, output_dir=str(tmp_path / "import"))
    run = import_prefs.run(cfg)
    printed = capsys.readouterr().out
    assert ("gold: 12 labels by 3 annotators: 1 0.750 (3/4), 2 0.250 (1/4), 7 0.750 (3/4); "
            "dropped below min_gold_accuracy=0.5: 2") in printed
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["gold"] == DROP_2
    assert manifest["metrics"]["gold_labels"] == 12 and manifest["metrics"]["annotators_dropped"] == 1
    assert manifest["counts"]["labels_dropped_by_reason"] == {"low_gold_accuracy": 5}
    assert str(out / "tasks.jsonl") in manifest["inputs"]
    records = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["meta"]["annotators"] == ["1", "7"] for r in records)
    with pytest.raises(ConfigError, match="min_gold_accuracy needs tasks="):
        import_prefs.run(import_prefs.Config(inputs=[str(csv_file)], min_gold_accuracy=0.5, max_length=0,
                                             output_dir=str(tmp_path / "import2")))
