"""Every sample file in data/human/ imports with exactly the expected pairs; bad rows get the right reasons."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from align.data.formats import detect_format, read_rows
from align.data.importers import ImportResult, ImportSettings, import_files
from align.errors import ConfigError, DataError

HUMAN = Path(__file__).resolve().parent.parent / "data" / "human"


def load(name: str, **settings) -> ImportResult:
    return import_files([HUMAN / name], ImportSettings(**settings))


def triples(result: ImportResult) -> list[tuple[str, str, str]]:
    """(last prompt turn, chosen, rejected) of every accepted record, in output order."""
    return [(r.prompt[-1]["content"], r.chosen[0]["content"], r.rejected[0]["content"]) for r in result.records]


def outcomes(result: ImportResult) -> dict[str, str | None]:
    """row origin suffix (':line' or '[index]') -> reject reason (None when accepted)."""
    out = {}
    for row in result.rows:
        suffix = re.search(r"(:\d+|\[\d+\])$", row.origin).group(1)
        out[suffix] = row.rejected[0] if row.rejected else None
    return out


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (HUMAN / name).read_text().splitlines()]


def test_pairs_jsonl_every_shape():
    rows = jsonl("pairs.jsonl")
    result = load("pairs.jsonl")
    assert result.formats == {str(HUMAN / "pairs.jsonl"): "pairs"}
    expected = [(r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"],
                 r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"],
                 r["rejected"] if isinstance(r["rejected"], str) else r["rejected"][0]["content"]) for r in rows[:5]]
    expected.append((rows[5]["chosen"][2]["content"], rows[5]["chosen"][3]["content"],
                     rows[5]["rejected"][3]["content"]))
    assert triples(result) == expected
    recs = result.records
    assert recs[1].prompt == rows[1]["prompt"]  # system + user kept
    assert recs[5].prompt == rows[5]["chosen"][:3]  # implicit prompt: the shared turns
    assert recs[0].meta == {"source": "human", "format": "pairs", "annotators": ["ana"],
                            "origin": f"{HUMAN / 'pairs.jsonl'}:1"}
    assert recs[3].meta["margin"] == 2.5 and recs[3].meta["annotators"] == []
    assert result.accepted == 6 and not result.rejects()


def test_pairs_csv_and_parquet():
    csv_result = load("pairs.csv")
    assert csv_result.formats[str(HUMAN / "pairs.csv")] == "pairs"
    got = triples(csv_result)
    assert len(got) == 6
    assert got[2][1].endswith("\nTip: add the salt once the water boils so it dissolves fast.")  # multi-line cell
    assert [r.meta["annotators"] for r in csv_result.records] == [["ana"], ["ben"], ["ana"], [], ["ben"], ["ben"]]
    # the salt record spans lines 4-5, so the next record starts on line 6
    assert [r.meta["origin"].rsplit(":", 1)[1] for r in csv_result.records] == ["2", "3", "4", "6", "7", "8"]
    pq_result = load("pairs.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(HUMAN / "pairs.parquet").to_pylist()
    assert triples(pq_result) == [(r["prompt"], r["chosen"], r["rejected"]) for r in table]
    assert pq_result.records[2].meta["annotators"] == ["dee"]
    assert pq_result.records[0].meta["origin"] == f"{HUMAN / 'pairs.parquet'}[1]"


def test_pairs_bad_rows_get_their_reasons():
    # a word count stands in for the tokenizer: line 10's 600-word answer is too long
    measure = lambda prompt, response: sum(len(m["content"].split()) for m in prompt + response)
    result = import_files([HUMAN / "pairs_bad.jsonl"], ImportSettings(max_length=200), measure)
    assert outcomes(result) == {
        ":1": None, ":2": "empty_text", ":3": "same_response", ":4": "missing_field", ":5": "wrong_type",
        ":6": "duplicate", ":7": "invalid_json", ":8": "undecodable", ":9": "not_an_object", ":10": "too_long",
        ":11": "wrong_type"}
    rejects = result.rejects()
    assert all(r["origin"].startswith(str(HUMAN / "pairs_bad.jsonl")) and r["detail"] for r in rejects)
    assert "role 'chef'" in rejects[-1]["detail"]
    assert len(result.records) == 1
    # without a length limit the long row is accepted
    assert outcomes(load("pairs_bad.jsonl"))[":10"] is None


def test_pairs_ab_orientation_aggregation_and_agreement():
    result = load("pairs_ab.jsonl")
    rows = jsonl("pairs_ab.jsonl")
    best = {r["prompt"]: (r["response_a"] if r["preference"].lower() == "a" else r["response_b"]) for r in rows
            if r["annotator"] == "ana" and r["preference"] != "tie"}
    other = {r["prompt"]: (r["response_b"] if r["preference"].lower() == "a" else r["response_a"]) for r in rows
             if r["annotator"] == "ana" and r["preference"] != "tie"}
    prompts = [rows[i]["prompt"] for i in (0, 2, 6, 9)]  # egg, butter, rice (ben saw it swapped), garlic
    assert triples(result) == [(p, best[p], other[p]) for p in prompts]
    assert result.records[1].meta["votes"] == {"chosen": 2, "rejected": 0, "tie": 0}
    assert result.records[1].meta["annotators"] == ["ana", "ben"]
    assert outcomes(result) == {":1": None, ":2": None, ":3": None, ":4": None, ":5": "no_majority",
                                ":6": "no_majority", ":7": None, ":8": None, ":9": "tie", ":10": None,
                                ":11": "no_majority", ":12": "no_majority"}
    agreement = result.agreement()
    # units (ana, ben) in canonical orientation: egg (a,a) butter (b,b) basil (b,tie) rice (b,b) chicken (b,a).
    # raw 3/5. kappa: p_o = .6, p_e = (1*2 + 4*2)/25 = .4 -> 1/3. alpha: n_a=3 n_b=6 n_tie=1, D_o=4,
    # sum n_c n_k = 54 -> 1 - 9 * 4 / 54 = 1/3.
    assert agreement["units_multi"] == 5 and agreement["raw_agreement"] == pytest.approx(0.6)
    assert agreement["cohen_kappa"] == pytest.approx(1 / 3) and agreement["krippendorff_alpha"] == pytest.approx(1 / 3)
    assert agreement["ties_dropped"] == 1 and agreement["disagreements_dropped"] == 2
    assert agreement["per_annotator"]["ben"] == {"labels": 5, "ties": 1, "agreement": 0.6}
    # unanimous drops the same units; `all` keeps every non-tie label as its own record
    assert len(load("pairs_ab.jsonl", aggregate="unanimous").records) == 4
    every = load("pairs_ab.jsonl", aggregate="all")
    assert len(every.records) == 10 and every.accepted == 10  # 12 labels - 2 ties


def test_scores_one_row_per_response_policies_and_margin():
    rows = jsonl("scores_rows.jsonl")
    text = [r["response"] for r in rows]
    result = load("scores_rows.jsonl")
    assert triples(result) == [(rows[0]["prompt"], text[0], text[2]), (rows[3]["prompt"], text[4], text[3])]
    assert result.records[0].meta["scores"] == {"chosen": 9.0, "rejected": 2.0}
    assert result.records[0].meta["margin"] == 7.0
    assert result.records[0].meta["origin"] == f"{HUMAN / 'scores_rows.jsonl'}:1 + {HUMAN / 'scores_rows.jsonl'}:3"
    assert outcomes(result) == {":1": None, ":2": None, ":3": None, ":4": None, ":5": None,
                                ":6": "single_response", ":7": "tie", ":8": "tie"}
    rest = load("scores_rows.jsonl", pairs="best_vs_rest")
    assert triples(rest)[:2] == [(rows[0]["prompt"], text[0], text[1]), (rows[0]["prompt"], text[0], text[2])]
    assert len(load("scores_rows.jsonl", pairs="all").records) == 4  # 3 egg pairs + butter
    strict = load("scores_rows.jsonl", min_margin=5.5)  # butter's 8 vs 3 is below the margin
    assert len(strict.records) == 1 and outcomes(strict)[":4"] == "below_min_margin"
    assert strict.labels["below_min_margin"] == 1


def test_scores_completion_lists():
    rows = jsonl("scores_lists.jsonl")
    result = load("scores_lists.jsonl")
    first, second = rows[0]["completions"], rows[1]["responses"]
    assert triples(result) == [(rows[0]["prompt"], first[0]["response"], first[1]["response"]),
                               (rows[1]["prompt"], second[1], second[2])]
    assert result.records[1].meta["scores"] == {"chosen": 9.0, "rejected": 2.0}
    assert outcomes(result) == {":1": None, ":2": None, ":3": "tie"}


def test_rankings():
    rows = jsonl("rankings.jsonl")
    result = load("rankings.jsonl")
    onion = rows[1]["completions"]
    assert triples(result) == [(rows[0]["prompt"], rows[0]["responses"][1], rows[0]["responses"][2]),
                               (rows[1]["prompt"], onion[1]["response"], onion[0]["response"])]
    assert outcomes(result) == {":1": None, ":2": None, ":3": "tie"}
    every = load("rankings.jsonl", pairs="all")
    assert len(every.records) == 3 + 5  # salt: 3 pairs; onion: 6 pairs minus the rank-2 tie
    assert every.labels["tie"] == 2  # the onion rank-2 tie and the pasta tie


def test_labelstudio_pairwise():
    tasks = {t["id"]: t["data"] for t in json.loads((HUMAN / "labelstudio_pairwise.json").read_text())}
    result = load("labelstudio_pairwise.json")
    left = lambda i: (tasks[i]["prompt"], tasks[i]["answer1"], tasks[i]["answer2"])
    right = lambda i: (tasks[i]["prompt"], tasks[i]["answer2"], tasks[i]["answer1"])
    assert triples(result) == [left(1), right(2), left(3), right(8), left(10)]
    assert result.records[4].meta["votes"] == {"chosen": 2, "rejected": 1, "tie": 0}
    assert result.records[3].meta["annotators"] == ["3"]  # completed_by {"id": 3, "email": ...}
    assert outcomes(result) == {"[1]": None, "[2]": None, "[3]": None, "[4]": "no_annotations", "[5]": "no_majority",
                                "[6]": "empty_annotation", "[7]": "cancelled", "[8]": None, "[9]": None}
    assert result.labels["cancelled"] == 3 and result.labels["empty_annotation"] == 1


def test_labelstudio_ranker_and_choices():
    tasks = {t["id"]: t["data"] for t in json.loads((HUMAN / "labelstudio_ranker.json").read_text())}
    items = {i: {it["id"]: it["body"] for it in d["items"]} for i, d in tasks.items()}
    result = load("labelstudio_ranker.json")
    assert triples(result) == [(tasks[1]["prompt"], items[1]["a"], items[1]["b"]),
                               (tasks[1]["prompt"], items[1]["a"], items[1]["c"]),
                               (tasks[2]["prompt"], items[2]["c"], items[2]["a"])]  # buckets: best vs worst
    tasks = {t["id"]: t["data"] for t in json.loads((HUMAN / "labelstudio_choices.json").read_text())}
    result = load("labelstudio_choices.json")
    assert triples(result) == [(tasks[i]["prompt"], tasks[i][c], tasks[i][r]) for i, c, r in
                               ((1, "answer2", "answer1"), (2, "answer1", "answer2"), (5, "answer2", "answer1"))]
    assert outcomes(result) == {"[1]": None, "[2]": None, "[3]": "tie", "[4]": "unknown_label", "[5]": None}


def test_argilla_v2_flattened_ranking_and_label():
    recs = {r["id"]: r for r in json.loads((HUMAN / "argilla_v2.json").read_text())}
    result = load("argilla_v2.json")
    assert result.formats[str(HUMAN / "argilla_v2.json")] == "argilla"
    assert triples(result) == [(recs[i]["prompt"], recs[i][c], recs[i][r]) for i, c, r in
                               (("rec-1", "response2", "response3"), ("rec-2", "response1", "response3"),
                                ("rec-3", "response2", "response1"))]
    assert result.records[0].meta["votes"]["chosen"] == 2
    assert outcomes(result) == {"[1]": None, "[2]": None, "[3]": None, "[4]": "tie"}
    assert result.labels["not_submitted"] == 1  # the discarded response of rec-2


def test_argilla_v1_rating_ranking_label():
    recs = json.loads((HUMAN / "argilla_v1.json").read_text())
    f = [r["fields"] for r in recs]
    result = load("argilla_v1.json")
    assert triples(result) == [(f[0]["prompt"], f[0]["response-1"], f[0]["response-2"]),
                               (f[1]["prompt"], f[1]["response-2"], f[1]["response-1"]),
                               (f[2]["prompt"], f[2]["response-1"], f[2]["response-2"])]
    assert result.records[0].meta["scores"] == {"chosen": 4.5, "rejected": 1.5}  # ratings 5/2 and 4/1
    assert outcomes(result) == {"[1]": None, "[2]": None, "[3]": None, "[4]": "not_submitted"}
    assert result.labels["not_submitted"] == 2  # the draft of fb-3 and the discarded fb-4


def test_hh_multi_turn_prompt():
    rows = jsonl("hh.jsonl")
    result = load("hh.jsonl")
    assert result.formats[str(HUMAN / "hh.jsonl")] == "hh"
    assert len(result.records) == 3
    second = result.records[1]
    assert [m["role"] for m in second.prompt] == ["user", "assistant", "user"]
    assert second.prompt[0]["content"] == "I'm baking banana bread tonight."
    assert rows[1]["chosen"].endswith(second.chosen[0]["content"])
    assert rows[1]["rejected"].endswith(second.rejected[0]["content"])


def test_hh_bad_transcripts(tmp_path):
    from conftest import write_jsonl

    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hello\n\nAssistant: b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: nope"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    result = import_files([path], ImportSettings(format="hh"))
    assert [r.rejected[0] if r.rejected else None for r in result.rows] == [
        "prompt_mismatch", "malformed_transcript", "empty_text", None]


def test_shp():
    rows = jsonl("shp.jsonl")
    result = load("shp.jsonl")
    assert triples(result) == [(rows[0]["history"], rows[0]["human_ref_A"], rows[0]["human_ref_B"]),
                               (rows[1]["history"], rows[1]["human_ref_B"], rows[1]["human_ref_A"]),
                               (rows[2]["history"], rows[2]["human_ref_A"], rows[2]["human_ref_B"])]
    assert result.records[1].meta["scores"] == {"chosen": 37.0, "rejected": 3.0}


def test_columns_map_other_field_names(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("question,better,worse,who\nHow do I zest a lemon?,Use a microplane. Tip: zest before "
                    "juicing.,Lemons are yellow.,ana\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        import_files([path], ImportSettings())
    columns = {"prompt": "question", "chosen": "better", "rejected": "worse", "annotator": "who"}
    result = import_files([path], ImportSettings(columns=columns))
    assert triples(result) == [("How do I zest a lemon?", "Use a microplane. Tip: zest before juicing.",
                                "Lemons are yellow.")]
    assert result.records[0].meta["annotators"] == ["ana"]
    with pytest.raises(ConfigError, match="unknown canonical name"):
        import_files([path], ImportSettings(columns={"question": "prompt"}))


def test_auto_detection_names_the_candidates(tmp_path):
    from conftest import write_jsonl

    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "y", "response_a": "x",
                                                  "response_b": "y", "preference": "a"}])
    with pytest.raises(DataError, match=r"several formats \(pairs, pairs_ab\); choose one with format="):
        detect_format(read_rows(both), {}, str(both))
    assert len(import_files([both], ImportSettings(format="pairs_ab")).records) == 1
    for name, fmt in (("labelstudio_pairwise.json", "labelstudio"), ("argilla_v1.json", "argilla"),
                      ("shp.jsonl", "shp"), ("rankings.jsonl", "rankings"), ("scores_rows.jsonl", "scores"),
                      ("pairs_ab.jsonl", "pairs_ab")):
        assert detect_format(read_rows(HUMAN / name), {}, name) == fmt


LS_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "labelstudio"


@pytest.mark.parametrize("name", ["pairwise", "ranker", "choices"])
@pytest.mark.parametrize("ext", ["json_min.json", "csv", "tsv"])
def test_labelstudio_converter_exports_give_the_json_exports_pairs(name, ext):
    """JSON_MIN / CSV / TSV made by Label Studio's own converter (tests/fixtures/labelstudio/README.md)."""
    path = LS_FIXTURES / f"{name}.{ext}"
    assert detect_format(read_rows(path), {}, path.name) == "labelstudio"
    reference, result = load(f"labelstudio_{name}.json"), import_files([path], ImportSettings())
    assert triples(result) == triples(reference)
    assert [r.prompt for r in result.records] == [r.prompt for r in reference.records]
    annotators = [r.meta["annotators"] for r in reference.records]
    if name == "pairwise":  # task 8's completed_by {"id": 3, "email": ...}: the converter keeps the email
        assert annotators[3] == ["3"]
        annotators[3] = ["cam@example.com"]
    assert [r.meta["annotators"] for r in result.records] == annotators
    # one row per annotation; cancelled annotations are not in these exports
    assert result.rejected_by_reason() == {
        "pairwise": {"no_annotations": 1, "empty_annotation": 1, "no_majority": 2},  # task 5's two labels
        "ranker": {}, "choices": {"tie": 1, "unknown_label": 1}}[name]
    assert result.records[0].meta["origin"].startswith(f"{path}")


def test_labelstudio_flat_row_needs_the_control_name_when_ambiguous(tmp_path):
    from conftest import write_jsonl

    rows = [{"prompt": "p", "answer1": "x", "answer2": "y", "verdict": "answer2", "note": "hard one",
             "id": 1, "annotator": 4, "annotation_id": 9, "created_at": None, "updated_at": None, "lead_time": 2.0}]
    path = write_jsonl(tmp_path / "min.jsonl", rows)
    result = import_files([path], ImportSettings())
    assert result.records == [] and result.rejected_by_reason() == {"missing_field": 1}
    result = import_files([path], ImportSettings(columns={"preference": "verdict"}))
    assert triples(result) == [("p", "y", "x")] and result.records[0].meta["annotators"] == ["4"]
