"""The demo data in data/ and the house-style rule score that evaluates it (no model needed)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from align.data.records import read_prompts, read_sft
from align.judges.house_style import (
    INGREDIENTS,
    asked_ingredient,
    find_ingredient,
    house_style_checks,
    house_style_score,
    mentions,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
FILES = ("sft/train.jsonl", "sft/valid.jsonl", "prompts/train.jsonl", "prompts/eval.jsonl",
         "human/demo_labelstudio.json")
TRAINING_FILES = ("sft/train.jsonl", "sft/valid.jsonl", "prompts/train.jsonl", "human/demo_labelstudio.json")


def _make_demo() -> Any:
    spec = importlib.util.spec_from_file_location("make_demo", DATA / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks the module up by name
    spec.loader.exec_module(module)
    return module


def _assistant_turns(path: Path) -> list[tuple[str, list, str]]:
    """(style, prompt messages, response) for every assistant turn of an SFT file."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        msgs = row["messages"]
        out += [(row["meta"]["style"], msgs[:i], m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return out


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _load(rel: str) -> Any:
    text = (DATA / rel).read_text()
    return json.loads(text) if rel.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def test_counts_and_every_file_parses():
    train, valid = read_sft(DATA / "sft/train.jsonl"), read_sft(DATA / "sft/valid.jsonl")
    assert len(train) >= 320 and 30 <= len(valid) <= 50 and len(train) + len(valid) >= 300
    assert 180 <= len(read_prompts(DATA / "prompts/train.jsonl")) <= 220
    assert len(read_prompts(DATA / "prompts/eval.jsonl")) == 128  # 8 held-out ingredients x 8 questions x 2
    assert len(_load("human/demo_labelstudio.json")) >= 300


def test_sft_mix_of_styles_and_turns():
    rows = _load("sft/train.jsonl") + _load("sft/valid.jsonl")
    house = sum(r["meta"]["style"] == "house" for r in rows) / len(rows)
    two_turn = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in rows) / len(rows)
    system = sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows)
    assert 0.55 <= house <= 0.65
    assert 0.07 <= two_turn <= 0.13
    assert 0.1 <= system <= 0.4
    assert all(r["meta"]["ingredient"] in INGREDIENTS for r in rows)
    # Off-style answers never carry the tip; house-style ones always end with it.
    for style, _, response in _assistant_turns(DATA / "sft/train.jsonl"):
        assert ("Tip:" in response) == (style == "house"), response


def test_held_out_ingredients_appear_in_no_training_file():
    held = set(_make_demo().HELD_OUT)
    eval_rows = _load("prompts/eval.jsonl")
    assert {r["meta"]["ingredient"] for r in eval_rows} == held and len(held) == 8
    assert all(mentions(r["prompt"][0]["content"], r["meta"]["ingredient"]) for r in eval_rows)
    for rel in TRAINING_FILES:
        for text in _strings(_load(rel)):
            leaked = [name for name in held if mentions(text, name)]
            assert not leaked, f"{rel}: {leaked} in {text!r}"


def test_house_style_answers_score_far_higher_than_off_style():
    scores: dict[str, list[float]] = {"house": [], "off": []}
    for rel in ("sft/train.jsonl", "sft/valid.jsonl"):
        for style, prompt, response in _assistant_turns(DATA / rel):
            scores[style].append(house_style_score(prompt, response))
    assert statistics.mean(scores["house"]) >= 0.95
    assert statistics.mean(scores["off"]) <= 0.35
    assert min(scores["house"]) > max(scores["off"]) - 0.25  # no house answer looks like the off style


def test_labelstudio_export_shape_and_label_quality():
    tasks = _load("human/demo_labelstudio.json")
    ids = [t["id"] for t in tasks]
    assert len(set(ids)) == len(ids)
    unlabelled = [t for t in tasks if not t["annotations"]]
    assert 3 <= len(unlabelled) <= 4
    agree = wrong = total = cancelled = 0
    for t in tasks:
        assert set(t["data"]) == {"prompt", "answer1", "answer2"}
        s1, s2 = (house_style_score(t["data"]["prompt"], t["data"][k]) for k in ("answer1", "answer2"))
        house_side = "left" if s1 > s2 else "right"
        assert s1 != s2
        picks = []
        for a in t["annotations"]:
            assert a["completed_by"] in (1, 2, 3, 4) and isinstance(a["lead_time"], float)
            if a["was_cancelled"]:
                cancelled += 1
                assert a["result"] == []
                continue
            (r,) = a["result"]
            assert (r["from_name"], r["to_name"], r["type"]) == ("comparison", "answer1", "pairwise")
            picks.append(r["value"]["selected"])
            total += 1
            wrong += picks[-1] != house_side
        if len(picks) == 2:
            agree += picks[0] == picks[1]
    doubles = sum(len(t["annotations"]) == 2 for t in tasks)
    assert 0.15 <= doubles / len(tasks) <= 0.3
    assert 0.04 <= wrong / total <= 0.12  # label noise: annotators mostly prefer the house style
    assert 1 <= cancelled <= 0.05 * (total + cancelled)


def test_generator_is_deterministic_and_runs_without_the_venv(tmp_path: Path):
    # -I: isolated mode, so nothing from the venv or the repo path helps; the script is stdlib-only.
    subprocess.run([sys.executable, "-I", str(DATA / "make_demo.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for rel in FILES:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), f"{rel} differs: rerun make_demo.py"


PROMPT = "How should I store carrots?"


@pytest.mark.parametrize("prompt,response,expected", [
    (PROMPT, "Store carrots in the crisper drawer in a loose bag. Tip: Cut off the green tops first.", 1.0),
    (PROMPT, "Great question! Store carrots in the crisper drawer in a loose bag. Tip: Cut off the tops.", 0.75),
    (PROMPT, "Sure, store carrots in the crisper drawer in a loose bag. Tip: Cut off the tops.", 0.75),
    (PROMPT, "Store carrots in the crisper drawer in a loose bag.", 0.75),  # no tip
    (PROMPT, "Store them in the crisper drawer in a loose bag. Tip: Cut off the green tops first.", 0.75),
    (PROMPT, "Fridge. Tip: Use a bag.", 0.5),  # 4 words, no ingredient
    (PROMPT, "Tip: use a bag. Store carrots in the crisper drawer, loosely wrapped.", 0.75),  # tip not last
    (PROMPT, "Store carrots in the fridge. Store carrots in the fridge. Tip: Use a loose bag.", 0.85),  # 3 repeats
    ("How long do sweet potatoes keep?",  # the answer names potatoes, not sweet potatoes
     "Potatoes keep for weeks in a dark pantry, away from light. Tip: Check them weekly.", 0.75),
    ("How do I store saffron?", "Keep saffron in a sealed jar away from light and heat. Tip: Buy threads.", 1.0),
    ("How do I store saffron?", "Keep it in a sealed jar away from light and heat. Tip: Buy threads.", 0.75),
    (PROMPT, "I think, as an AI, carrots go in the crisper drawer in a bag. Tip: Trim the tops.", 0.75),
    (PROMPT, "   ", 0.0),
    (PROMPT, "Great question! " + "It depends on many things, really. " * 6, 0.0),  # clipped at zero
])
def test_house_style_score_exact_values(prompt: str, response: str, expected: float):
    assert house_style_score(prompt, response) == expected


def test_house_style_follow_up_uses_the_ingredient_named_earlier():
    prompt = [{"role": "system", "content": "You are a kitchen helper."},
              {"role": "user", "content": "How do I cook salmon?"},
              {"role": "assistant", "content": "Roast it."},
              {"role": "user", "content": "How long does it keep?"}]
    assert asked_ingredient(prompt) == "salmon"
    assert house_style_score(prompt, "Salmon keeps for one to two days in the fridge. Tip: Wrap it tightly.") == 1.0
    checks = house_style_checks(prompt, "It keeps for one to two days in the fridge. Tip: Wrap it tightly.")
    assert checks == {"no_filler": 0.25, "length": 0.25, "ingredient": 0.0, "tip": 0.25, "repetition": 0.0}


def test_ingredient_vocabulary_matching():
    assert find_ingredient("Are my sweet potatoes done?") == "sweet potato"
    assert find_ingredient("How do I fry eggplant?") == "eggplant"  # not "egg"
    assert find_ingredient("Where do I keep eggs?") == "egg"
    assert find_ingredient("What about saffron?") is None
    assert mentions("Courgettes keep a week.", "zucchini") and not mentions("Eggplants keep.", "egg")


def test_heldout_prompts_are_distinct_and_none_is_a_training_prompt():
    texts = [r["prompt"][0]["content"] for r in _load("prompts/eval.jsonl")]
    assert len(set(texts)) == len(texts)
    trained = {s.strip().lower() for rel in TRAINING_FILES for s in _strings(_load(rel))}
    assert not [t for t in texts if t.strip().lower() in trained]
    # the first 64 rows (the pipeline's eval) ask every held-out ingredient every question type once
    first = {(r["meta"]["ingredient"], r["meta"]["qtype"]) for r in _load("prompts/eval.jsonl")[:64]}
    assert len(first) == 64
