"""Better judges (issue 14): log-probability verdicts with a confidence, constrained output and logprobs for the
openai judge, and the judge report (agreement, kappa, position and length bias) against human labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from align.config import load_config
from align.judges import Verdict
from align.judges.prompted import Answer, CallError, combine
from align.judges.report import Row, cohen_kappa, judge_report

ROOT = Path(__file__).resolve().parent.parent
Q = [{"role": "user", "content": "How long to boil an egg?"}]

# ---- the judge report, against hand-computed numbers ----

TABLE = [  # verdict, human, len_a, len_b, picks per presentation, who was shown first in each
    Row("a", "a", 20, 10, ("a", "a"), ("a", "b")),
    Row("b", "a", 10, 30, ("b", "b"), ("a", "b")),
    Row("a", "b", 50, 5, ("a",), ("a",)),
    Row("b", "b", 5, 50, ("b", "b"), ("a", "b")),
    Row("abstain", "a", 10, 12, ("a", "b"), ("a", "b")),  # the orders disagreed: both readings favour position 1
    Row("tie", "b", 7, 7, ("tie", "tie"), ("a", "b")),
    Row("failed", "a", 3, 4),
    Row("a", "a", 8, 8),  # a score judge: no presentations
]


def test_judge_report_matches_hand_computed_numbers() -> None:
    r = judge_report(TABLE)
    # Decisive rows 1,2,3,4,8; the judge matches the humans on 1, 4 and 8.
    assert (r["pairs"], r["decisive"], r["coverage"]) == (8, 5, 5 / 8)
    assert r["agreement"] == pytest.approx(3 / 5)
    # judge says a on 3/5, humans on 3/5: p_e = .6*.6 + .4*.4 = .52; kappa = (.6 - .52) / (1 - .52) = 1/6.
    assert r["cohen_kappa"] == pytest.approx(1 / 6)
    # Decisive readings: row1 1 of 2 won by the first shown, row2 1/2, row3 1/1, row4 1/2, row5 2/2 -> 6 of 9.
    assert r["position_readings"] == 9 and r["position_first_wins"] == pytest.approx(6 / 9)
    # Unequal-length decisive rows 1-4: the judge always picked the longer, the humans on rows 1 and 4.
    assert r["length_pairs"] == 4 and r["judge_longer_wins"] == 1.0 and r["human_longer_wins"] == 0.5
    assert r["length_bias"] == pytest.approx(0.5)
    assert (r["abstains"], r["ties"], r["failures"]) == (1, 1, 1)
    assert r["abstain_rate"] == pytest.approx(1 / 7) and r["tie_rate"] == pytest.approx(1 / 7)
    assert r["failure_rate"] == pytest.approx(1 / 8)
    json.dumps(r)  # goes into the manifest as is


def test_judge_report_edge_cases() -> None:
    empty = judge_report([])
    assert empty["agreement"] is None and empty["cohen_kappa"] is None and empty["failure_rate"] is None
    perfect = [Row("a", "a", 1, 2), Row("b", "b", 2, 1), Row("a", "a", 3, 3)]
    assert judge_report(perfect)["agreement"] == 1.0 and cohen_kappa(perfect) == pytest.approx(1.0)
    assert cohen_kappa([Row("a", "a", 1, 2)] * 3) is None  # chance agreement is 1: kappa is undefined
    opposite = [Row("a", "b", 1, 2), Row("b", "a", 2, 1)]
    assert cohen_kappa(opposite) == pytest.approx(-1.0)


def test_the_judge_stage_writes_a_judge_report(tmp_path: Path) -> None:
    from conftest import write_jsonl

    from align.runs import read_manifest
    from align.stages.judge import Config, run

    # Both inputs as run folders of the stages that make them (resolved by align.runs.resolve_input).
    samples = write_jsonl(tmp_path / "generate/samples.jsonl", [
        {"id": "p0", "prompt": Q, "responses": ["nine minutes", "about nine or ten minutes"]}]).parent
    humans = write_jsonl(tmp_path / "import/preferences.jsonl", [  # ShorterJudge agrees where the shorter was chosen
        {"prompt": Q, "chosen": "short", "rejected": "a longer answer"},
        {"prompt": Q, "chosen": "tiny", "rejected": "somewhat longer"},
        {"prompt": Q, "chosen": "the humans liked this long one", "rejected": "brief"},
        {"prompt": Q, "chosen": "ok", "rejected": "not ok at all"},
        {"prompt": Q, "chosen": "UNSURE x", "rejected": "y"},  # the judge fails on this one
    ]).parent
    for folder, stage, output in ((samples, "generate", "samples"), (humans, "import", "preferences")):
        (folder / "manifest.json").write_text(json.dumps(
            {"stage": stage, "status": "completed", "outputs": {output: f"{output}.jsonl"}}))
    cfg = load_config(Config, ROOT / "stages/tiny/judge.yaml", [
        f"samples={samples}", f"output_dir={tmp_path / 'run'}", "judge=test_judges:ShorterJudge",
        f"human={humans}", "max_failure_rate=0.5"])
    manifest = read_manifest(run(cfg))
    report = manifest["judge_report"]
    assert (report["pairs"], report["decisive"], report["failures"]) == (5, 4, 1)
    assert report["agreement"] == 0.75 and report["failure_rate"] == 0.2
    assert report["judge_longer_wins"] == 0.0 and report["human_longer_wins"] == 0.25
    assert report["length_bias"] == -0.25 and report["position_readings"] == 0
    assert report["position_first_wins"] is None  # ShorterJudge reports no per-order picks
    assert manifest["metrics"]["human_agreement"] == 0.75 and manifest["metrics"]["human_decisive"] == 4


# ---- combining answers: text or probabilities, both orders, confidence ----

def test_combine_with_probabilities() -> None:
    v = combine(Answer("", 0.8), Answer("", 0.4), decide="prob")  # P(a) per order: 0.8 and 1 - 0.4
    assert (v.winner, v.orders) == ("a", ("a", "a")) and v.confidence == pytest.approx(0.7)
    low = combine(Answer("", 0.8), Answer("", 0.4), decide="prob", min_confidence=0.75)
    assert low.winner == "abstain" and not low.failed and low.confidence == pytest.approx(0.7)
    biased = combine(Answer("", 0.9), Answer("", 0.9), decide="prob")  # always "A": position bias cancels
    assert biased.winner == "tie" and biased.orders == ("a", "b") and biased.confidence == pytest.approx(0.5)
    assert combine(Answer("", 0.2), None, decide="prob").winner == "b"
    assert combine(Answer("x", None), Answer("y", 0.5), decide="prob").failed
    assert combine(CallError("HTTP 500"), Answer("", 0.5), decide="prob").error == "HTTP 500"
    # Text verdicts with log-probabilities: the text decides, the probabilities give the confidence.
    text = combine(Answer("Verdict: A", 0.9), Answer("Verdict: B", 0.3))
    assert text.winner == "a" and text.confidence == pytest.approx(0.8)
    assert combine("Verdict: A", "Verdict: B").confidence is None
    assert combine(Answer("Verdict: A", 0.6), None, min_confidence=0.7).winner == "abstain"
    round_trip = Verdict.from_json(json.loads(json.dumps(text.to_json())))
    assert round_trip == text and text.to_json()["confidence"] == pytest.approx(0.8)


# ---- the llm judge's logprob mode on a tiny random model ----

def test_logprob_verdicts_on_a_tiny_model(tiny_model: Path) -> None:
    from align.generation.select import BackendSettings
    from align.judges.llm import Config, LLMJudge

    hf = BackendSettings(backend="hf", dtype="float32")
    judge = LLMJudge(Config(model=str(tiny_model), verdict="logprob", engine=hf))
    pairs = [("Nine minutes.", "Ten minutes, then ice."), ("Salt the water.", "No."), ("Yes", "Yes, always"),
             ("Boil, then simmer.", "Steam it for twelve minutes with the lid on.")]
    verdicts = judge.judge([Q] * 4, pairs)
    assert all(not v.failed and len(v.orders) == 2 and v.confidence is not None for v in verdicts)
    assert all(0.5 <= v.confidence <= 1.0 and v.winner in ("a", "b", "tie") for v in verdicts)
    # Both orders are averaged, so swapping a and b mirrors the verdict (same 8 prompts in one batch).
    swapped = judge.judge([Q] * 4, [(b, a) for a, b in pairs])
    for v, w in zip(verdicts, swapped):
        assert w.confidence == pytest.approx(v.confidence, abs=1e-6)
        if v.confidence > 0.5 + 1e-5:
            assert w.winner == {"a": "b", "b": "a"}[v.winner]
    # Below min_confidence a verdict abstains (with its confidence); above it, it stands.
    threshold = sorted(v.confidence for v in verdicts)[2]
    strict = LLMJudge(Config(verdict="logprob", min_confidence=threshold), sampler=judge.sampler).judge([Q] * 4, pairs)
    for v, s in zip(verdicts, strict):
        assert s.confidence == pytest.approx(v.confidence)
        assert s.winner == ("abstain" if v.confidence < threshold else v.winner)
    assert sum(s.winner == "abstain" for s in strict) == 2


def test_batched_letter_logprobs_equal_one_at_a_time(tiny_model: Path) -> None:
    """Left padding with explicit position ids: a prompt's next-token log-probabilities do not depend on what it
    is batched with."""
    from align.generation.hf import chat_prompt_ids
    from align.judges.llm import hf_letter_logprobs, letter_ids
    from align.models.load import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, dtype="float32")
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 7, 20)]
    letters = [letter_ids(tok, "A"), letter_ids(tok, "B")]
    assert len(letters[0]) == 2  # "A" and " A" are both single tokens here
    batched = hf_letter_logprobs(model, tok.pad_token_id, prompts, letters, batch_size=3)
    alone = [hf_letter_logprobs(model, tok.pad_token_id, [p], letters, batch_size=1)[0] for p in prompts]
    for got, want in zip(batched, alone):
        assert got == pytest.approx(want, abs=1e-4)


def test_logprob_mode_needs_a_model() -> None:
    from align.errors import ConfigError
    from align.judges.llm import Config, LLMJudge

    class TextOnly:
        name = "text-only"

        def generate(self, prompts, params, n=1):
            raise AssertionError("not called")

    with pytest.raises(ConfigError, match="verdict=logprob needs"):
        LLMJudge(Config(verdict="logprob"), sampler=TextOnly())


# ---- the openai judge: constrained output and logprobs ----

def logprob_reply(text: str, letter: str, chosen: float, other: float) -> dict:
    """An OpenAI-style logprobs object: the verdict letter's token with its alternatives."""
    alt = "B" if letter == "A" else "A"
    tokens = [{"token": t, "logprob": -0.01, "top_logprobs": []} for t in ('{"', "verdict", '":', ' "')]
    tokens.append({"token": letter, "logprob": math.log(chosen),
                   "top_logprobs": [{"token": letter, "logprob": math.log(chosen)},
                                    {"token": alt, "logprob": math.log(other)},
                                    {"token": "tie", "logprob": math.log(0.04)}]})
    return {"content": tokens}


def test_openai_judge_constrains_output_and_reads_a_confidence(tmp_path: Path) -> None:
    from test_judge_safety import FakeServer, completion, openai_spec, shorter

    from align.judges.registry import load_judge

    def respond(body: dict, headers: dict):
        letter = shorter(body)[-1]
        text = json.dumps({"verdict": letter})
        return completion(text, logprob_reply(text, letter, 0.75, 0.2) if body.get("logprobs") else None)

    server = FakeServer(respond)
    try:
        judge = load_judge(openai_spec(tmp_path, server.url, constrain="json_schema", logprobs=True)).judge
        [v] = judge.judge([Q], [("short", "a longer answer")])
        body = server.bodies[0]
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"]["properties"]["verdict"]["enum"] == ["A", "B", "tie"]
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        # a shown first: P(A) = .75 / .95; b shown first, "B" chosen: P(a) = 1 - .2 / .95. Both 0.789...
        assert v.winner == "a" and v.confidence == pytest.approx(0.75 / 0.95)
        strict = load_judge(openai_spec(tmp_path, server.url, logprobs=True, min_confidence=0.8)).judge
        assert strict.judge([Q], [("short", "a longer answer")])[0].winner == "abstain"

        server.bodies.clear()
        choice = load_judge(openai_spec(tmp_path, server.url, constrain="choice")).judge
        [c] = choice.judge([Q], [("a longer answer", "short")])
        assert server.bodies[0]["structured_outputs"] == {"choice": ["A", "B", "tie"]}
        assert "logprobs" not in server.bodies[0] and "response_format" not in server.bodies[0]
        assert c.winner == "b" and c.confidence is None  # no logprobs: the text alone decides
    finally:
        server.close()


def test_first_letter_probability_reads_the_verdict_token() -> None:
    from align.judges.openai import first_letter_probability

    content = [{"token": "A", "logprob": -9.0, "top_logprobs": []},  # "A rambles..." is not the verdict
               {"token": " rambles. Verdict:", "logprob": -0.1, "top_logprobs": []},
               {"token": " B", "logprob": -1.0,
                "top_logprobs": [{"token": " B", "logprob": -1.0}, {"token": " A", "logprob": -2.0},
                                 {"token": "B", "logprob": -3.0}, {"token": " C", "logprob": -0.5}]}]
    p = first_letter_probability({"content": content}, "A rambles. Verdict: B")
    assert p == pytest.approx(math.exp(-2) / (math.exp(-1) + math.exp(-3) + math.exp(-2)))
    assert first_letter_probability({"content": content}, "Verdict: tie") is None
    assert first_letter_probability(None, "Verdict: B") is None
    assert first_letter_probability({"content": [{"token": " B", "logprob": "nan?"}]}, "B") is None
