"""`align label`: stable task ids, candidates, selection on hand-made tables, gold, and the files each tool imports."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from align.data import labeling
from align.data.labeling import Task, make_task, select_tasks
from align.data.records import PreferenceRecord
from align.errors import AlignError, ConfigError, DataError
from align.stages import label

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "labelstudio"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_task_id_is_stable_and_ignores_the_display_order():
    prompt = user("How do I keep basil fresh?")
    a = make_task(prompt, ("water", "fridge"))
    assert a.task_id == make_task(prompt, ("fridge", "water")).task_id == labeling.task_id(prompt, ["water", "fridge"])
    assert len(a.task_id) == 16 and a.task_id != make_task(prompt, ("water", "freezer")).task_id
    assert a.task_id != make_task(user("How do I keep mint fresh?"), ("water", "fridge")).task_id
    # the committed fixture was made by `align label`: the ids must not drift
    first = json.loads((FIXTURES / "roundtrip_tasks.jsonl").read_text().splitlines()[0])
    assert labeling.task_id(first["prompt"], first["responses"]) == first["task_id"]


def test_candidates_from_samples_and_pairs():
    rows = [("s:1", {"prompt": "p1", "responses": ["a", "b", "c", "b", " "]}),  # duplicate and blank dropped
            ("s:2", {"prompt": "p2", "responses": ["x", "x"]}),  # one distinct response: skipped
            ("s:3", {"prompt": user("p3"), "response_a": "y", "response_b": [{"role": "assistant", "content": "z"}]}),
            ("s:4", {"prompt": "p4", "chosen": "good", "rejected": "bad"}),
            ("s:5", {"prompt": "p1", "responses": ["b", "a"]})]  # the same pair as row 1: one task
    tasks, skipped = labeling.candidate_tasks(rows, "pairs")
    assert skipped == 1
    assert [(t.prompt[-1]["content"], t.responses, t.origin) for t in tasks] == [
        ("p1", ("a", "b"), "s:1"), ("p1", ("a", "c"), "s:1"), ("p1", ("b", "c"), "s:1"),
        ("p3", ("y", "z"), "s:3"), ("p4", ("good", "bad"), "s:4")]
    tasks, _ = labeling.candidate_tasks(rows, "all")
    assert [t.responses for t in tasks] == [("a", "b", "c"), ("y", "z"), ("good", "bad"), ("b", "a")]
    with pytest.raises(DataError, match="s:9: no responses"):
        labeling.candidate_tasks([("s:9", {"prompt": "p"})], "pairs")


# a hand-made table: response -> reward; the margins of the pairs below are 0.9, 0.05, 0.3, 0.5 and 0.02
REWARDS = {"a1": 1.0, "a2": 0.1, "b1": 0.5, "b2": 0.45, "c1": -0.2, "c2": 0.1, "d1": 2.0, "d2": 1.5,
           "e1": 0.33, "e2": 0.31}
TABLE = [make_task(user(f"prompt {k}"), (f"{k}1", f"{k}2")) for k in "abcde"]


def fake_scorer(calls: list):
    def score(prompts, responses):
        calls.append(len(responses))
        return [REWARDS[r] for r in responses]
    return score


def test_uncertain_picks_the_smallest_reward_margins():
    calls: list[int] = []
    picked = select_tasks(TABLE, "uncertain", 2, seed=0, scorer=fake_scorer(calls))
    assert [t.responses[0] for t in picked] == ["e1", "b1"]  # margins 0.02 and 0.05
    assert [t.selection["method"] for t in picked] == ["uncertain", "uncertain"]
    assert [round(t.selection["reward_margin"], 6) for t in picked] == [0.02, 0.05]
    assert calls == [10]  # every response scored once, in one call
    every = select_tasks(TABLE, "uncertain", 0, seed=3, scorer=fake_scorer([]))
    assert [t.responses[0] for t in every] == ["e1", "b1", "c1", "d1", "a1"]
    # a 3-response task counts its closest two: 0.5 vs 0.45 -> 0.05
    three = make_task(user("three"), ("b1", "b2", "a1"))
    assert select_tasks([three], "uncertain", 1, 0, scorer=fake_scorer([]))[0].selection["reward_margin"] == \
        pytest.approx(0.05)


def verdict(task: Task, winner: str, *, flip: bool = False, scores=None, swap: bool = False, error=None) -> dict:
    a, b = task.responses[::-1] if swap else task.responses
    row = {"prompt_id": task.prompt_id, "response_a": a, "response_b": b, "winner": winner, "reason": "",
           "error": error, "orders": [winner, "b" if winner == "a" else "a"] if flip else [winner, winner]}
    return {**row, **({"scores": scores} if scores else {})}


def test_uncertain_by_judge_and_disagree():
    a, b, c, d, e = TABLE
    rows = [verdict(a, "a"),  # decisive, no scores: confident
            verdict(b, "a", flip=True),  # position flip: 0
            verdict(c, "a", scores=[0.75, 0.5]),  # score margin 0.25
            verdict(d, "abstain", swap=True)]  # abstain: 0; e: never judged
    verdicts = labeling.index_verdicts(rows)
    picked = select_tasks(TABLE, "uncertain", 0, seed=0, verdicts=verdicts)
    assert [t.responses[0] for t in picked][:2] in (["b1", "d1"], ["d1", "b1"])  # both 0, order seeded
    assert [t.responses[0] for t in picked][2:] == ["c1", "a1", "e1"]  # 0.25, decisive, unseen last
    assert picked[2].selection == {"method": "uncertain", "judge_confidence": 0.25}
    # disagree: the judge's winner is the reward model's loser. a: judge a (1.0 > 0.1) agrees;
    # c: judge a but c1 -0.2 < c2 0.1 -> margin 0.3; d: judge says b of (d2, d1) = d1 (2.0 > 1.5) agrees;
    # e: judge b = e2 0.31 < e1 0.33 -> margin 0.02; b: a tie is no verdict
    rows = [verdict(a, "a"), verdict(c, "a"), verdict(d, "b", swap=True), verdict(e, "b"), verdict(b, "tie")]
    picked = select_tasks(TABLE, "disagree", 0, 0, scorer=fake_scorer([]), verdicts=labeling.index_verdicts(rows))
    assert [(t.responses[0], round(t.selection["reward_margin"], 6)) for t in picked] == [("c1", 0.3), ("e1", 0.02)]
    with pytest.raises(AlignError, match="disagree needs"):
        select_tasks(TABLE, "disagree", 0, 0, scorer=fake_scorer([]))


def test_random_selection_is_seeded():
    one = select_tasks(TABLE, "random", 3, seed=7)
    assert [t.task_id for t in one] == [t.task_id for t in select_tasks(TABLE, "random", 3, seed=7)]
    assert len({t.task_id for t in one}) == 3 and all(t.selection == {"method": "random"} for t in one)
    assert len(select_tasks(TABLE, "random", 0, seed=7)) == 5


def test_gold_tasks_count_order_and_report():
    assert labeling.gold_count(90, 0.1) == 10 and labeling.gold_count(5, 0.5) == 5 and labeling.gold_count(5, 0) == 0
    records = [PreferenceRecord(user(f"q{i}"), [{"role": "assistant", "content": f"good {i}"}],
                                [{"role": "assistant", "content": f"bad {i}"}]) for i in range(6)]
    gold = labeling.gold_tasks(records, 4, seed=1, exclude={make_task(user("q0"), ("good 0", "bad 0")).task_id})
    assert len(gold) == 4 and "q0" not in {t.prompt[0]["content"] for t in gold}
    assert all(t.responses[t.gold].startswith("good") for t in gold)
    assert {t.gold for t in labeling.gold_tasks(records, 6, seed=1)} == {0, 1}  # shown on both sides
    mixed = labeling.mix_gold(TABLE, gold, seed=0)
    assert [t for t in mixed if t.gold is None] == TABLE and len(mixed) == 9
    # annotator 1: 3 of 4 right; 2: 1 of 4; unknown annotator: 1 of 2
    answers = [("1", True), ("1", True), ("1", False), ("1", True), ("2", False), ("2", True), ("2", False),
               ("2", False), (None, True), (None, False)]
    assert labeling.gold_report(answers, 0.5) == {
        "": {"gold_labels": 2, "correct": 1, "accuracy": 0.5, "dropped": False},
        "1": {"gold_labels": 4, "correct": 3, "accuracy": 0.75, "dropped": False},
        "2": {"gold_labels": 4, "correct": 1, "accuracy": 0.25, "dropped": True}}


def config(tmp_path: Path, **over) -> label.Config:
    over.setdefault("inputs", [str(FIXTURES / "samples.jsonl")])
    over.setdefault("output_dir", str(tmp_path / "label"))
    return label.Config(**over)


def test_stage_labelstudio_pairwise_with_gold(tmp_path, capsys):
    out = label.run(config(tmp_path, gold=str(FIXTURES / "gold.jsonl"), gold_rate=0.5, budget=0))
    read = lambda path: [{k: v for k, v in json.loads(line).items() if k != "origin"}
                         for line in path.read_text().splitlines()]
    tasks = read(out / "tasks.jsonl")
    assert tasks == read(FIXTURES / "roundtrip_tasks.jsonl")  # the same tasks as the committed fixture's run
    assert len(tasks) == 9 and sum(t["gold"] is not None for t in tasks) == 4
    ls = json.loads((out / "labelstudio_tasks.json").read_text())
    assert [t["data"]["task_id"] for t in ls] == [t["task_id"] for t in tasks]
    assert ls[0]["data"].keys() == {"task_id", "prompt_id", "prompt", "answer1", "answer2"}
    assert [[t["data"]["answer1"], t["data"]["answer2"]] for t in ls] == [t["responses"] for t in tasks]
    salt = next(t for t in ls if "salt" in t["data"]["prompt"])
    assert salt["data"]["prompt"] == "system: Answer in one or two sentences.\n\nuser: How much salt goes in pasta water?"
    xml = ET.fromstring((out / "labelstudio_config.xml").read_text())
    assert xml.find("Pairwise").attrib == {"name": "comparison", "toName": "answer1,answer2"}
    assert {el.get("value") for el in xml.iter("Text")} == {"$prompt", "$answer1", "$answer2"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "label"
    assert manifest["metrics"] == {"candidates": 5.0, "rows_skipped": 0.0, "selected": 5.0, "gold": 4.0, "tasks": 9.0}
    assert set(manifest["outputs"]) == {"tasks", "export", "config"}
    assert f"then: align import <the export> tasks={out}" in capsys.readouterr().out


def test_stage_ranker_argilla_and_plain_files(tmp_path):
    out = label.run(config(tmp_path, compare="all", tool="labelstudio", output_dir=str(tmp_path / "ls")))
    ls = json.loads((out / "labelstudio_tasks.json").read_text())
    assert sorted(len(t["data"]["items"]) for t in ls) == [2, 2, 3]
    assert ls[0]["data"]["items"][0].keys() == {"id", "title", "body"}
    xml = ET.fromstring((out / "labelstudio_config.xml").read_text())
    assert xml.find("Ranker").attrib == {"name": "rank", "toName": "answers"}
    assert xml.find("List").get("value") == "$items"

    out = label.run(config(tmp_path, compare="all", tool="argilla", output_dir=str(tmp_path / "ar")))
    settings = json.loads((out / "argilla_settings.json").read_text())
    assert [f["name"] for f in settings["fields"]] == ["prompt", "response-1", "response-2", "response-3"]
    assert [f["required"] for f in settings["fields"]] == [True, True, True, False]
    assert settings["questions"][0]["settings"]["options"][2] == {"value": "response-3", "text": "Response 3"}
    records = json.loads((out / "argilla_records.json").read_text())
    assert all(r["id"] == r["task_id"] for r in records) and sorted(len(r) for r in records) == [6, 6, 7]

    out = label.run(config(tmp_path, tool="csv", output_dir=str(tmp_path / "csv")))
    with open(out / "to_label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task_id", "prompt_id", "prompt", "response_a", "response_b", "preference", "annotator"]
    assert len(rows) == 5 and all(r["preference"] == "" for r in rows)
    out = label.run(config(tmp_path, tool="jsonl", compare="all", output_dir=str(tmp_path / "jsonl")))
    rows = [json.loads(line) for line in (out / "to_label.jsonl").read_text().splitlines()]
    assert {len(r["responses"]) for r in rows} == {2, 3} and all(r["ranks"] == [] for r in rows)
    assert any(r["prompt"][0]["role"] == "system" for r in rows)  # JSONL keeps the prompt's messages


def test_stage_selection_needs_its_inputs(tmp_path):
    with pytest.raises(ConfigError, match="uncertain needs reward_model"):
        label.run(config(tmp_path, selection="uncertain"))
    with pytest.raises(ConfigError, match="disagree needs both"):
        label.run(config(tmp_path, selection="disagree", judge="runs/judge"))
    bad = tmp_path / "one.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["same", "same"]}) + "\n")
    with pytest.raises(DataError, match="no prompt in .* has two different non-empty responses"):
        label.run(config(tmp_path, inputs=[str(bad)]))


def test_stage_uncertain_from_a_judge_run(tmp_path):
    from align.runs import start_run
    from align.stages.judge import Config as JudgeConfig

    tasks, _ = labeling.candidate_tasks(
        [(f"s:{i}", json.loads(line)) for i, line in enumerate((FIXTURES / "samples.jsonl").read_text().splitlines())],
        "pairs")
    judge_dir = tmp_path / "judge"
    run_ = start_run("judge", JudgeConfig(output_dir=str(judge_dir)))
    rice = next(t for t in tasks if "rice" in t.prompt[-1]["content"])
    rows = [verdict(t, "abstain" if t is rice else "a") for t in tasks]
    (judge_dir / "verdicts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_.add_output("verdicts", judge_dir / "verdicts.jsonl")
    run_.finish()
    out = label.run(config(tmp_path, selection="uncertain", judge=str(judge_dir), budget=1))
    picked = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    assert [t["task_id"] for t in picked] == [rice.task_id]
    assert picked[0]["selection"] == {"method": "uncertain", "judge_confidence": 0.0}


def test_stage_uncertain_with_a_reward_model_folder(tiny_model, tmp_path):
    """The real scorer: RewardModel.load(path).score on a tiny untrained classifier; the two smallest margins."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.reward_model import RewardModel

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    clf.config.pad_token_id = clf.config.eos_token_id
    clf.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    out = label.run(config(tmp_path, selection="uncertain", reward_model=str(tmp_path / "rm"), budget=2,
                           tool="jsonl"))
    picked = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    rm = RewardModel.load(tmp_path / "rm")
    tasks, _ = labeling.candidate_tasks(
        [(str(i), json.loads(line)) for i, line in enumerate((FIXTURES / "samples.jsonl").read_text().splitlines())],
        "pairs")
    margins = sorted((abs(a - b), t.task_id) for t in tasks
                     for a, b in [rm.score([t.prompt, t.prompt], list(t.responses))])
    assert [t["task_id"] for t in picked] == [tid for _, tid in margins[:2]]
    assert [t["selection"]["reward_margin"] for t in picked] == pytest.approx([m for m, _ in margins[:2]], abs=1e-5)
