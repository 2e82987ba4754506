"""Judges: verdict parsing, both-orders logic, spec loading and plug-ins, the judge stage, cache, failures."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from align.config import load_config
from align.errors import ConfigError
from align.judges import Verdict, judge_kind, verdict_from_scores
from align.judges.parse import parse_verdict
from align.judges.prompted import CallError, PairPrompt, combine, find_template, judge_pairs
from align.judges.registry import load_judge, read_spec

ROOT = Path(__file__).resolve().parent.parent

VERDICTS = [
    ("A", "a"), ("B", "b"), ("a", "a"), ("b.", "b"), (" B\n", "b"), ("[[A]]", "a"), ("[[B]]", "b"), ("[[C]]", "tie"),
    ("My final verdict is [[B]].", "b"), ("Verdict: A", "a"), ("verdict - b", "b"), ("Final verdict: Tie", "tie"),
    ("**Answer:** B", "b"), ("Answer: (A)", "a"), ("The answer is B.", "b"), ("Response A", "a"),
    ("Response B is better.", "b"), ("Assistant A is better", "a"), ("Output (b)", "b"),
    ("Output (a) is better.", "a"), ("The better response is Response A.", "a"),
    ("I prefer B because it is shorter.", "b"), ("I'd choose A.", "a"), ("A > B", "a"), ("B>A", "b"),
    ("A < B", "b"), ("A = B", "tie"), ("1", "a"), ("2", "b"), ("Response 2", "b"), ("Response 1 is better", "a"),
    ('{"winner": "B", "reason": "shorter"}', "b"), ('```json\n{"verdict": "A"}\n```', "a"),
    ('{"choice": "tie"}', "tie"), ('{"preferred": 1}', "a"), ('{"winner": "Response A"}', "a"), ("Tie", "tie"),
    ("Both responses are equally good.", "tie"), ("It's a tie.", "tie"), ("Neither is better", "tie"),
    ("The responses are equally helpful.", "tie"), ("Winner: B\nReason: it names the ingredient", "b"),
    ("Reasoning: A rambles while B answers directly. Verdict: B", "b"),
    ("After comparing, Response A is more concise. Therefore, the answer is A.", "a"),
    ("Verdict: Response B\n\nExplanation: Response A is too long", "b"),
    ("Answer: A. Both are fine but A is shorter.", "a"), ("<answer>B</answer>", "b"),
    ("The best response is: **B**", "b"), ("A is the better response.", "a"), ("Option B.", "b"),
    ("<think>A seems good but B is better</think>\nB", "b"), ("'A'", "a"), ('"B"', "b"),
    ("B\n\nExplanation: A is verbose.", "b"), ("Response B is worse than Response A.", "a"), ("**B**", "b"),
    ("The winner is Assistant B.", "b"), ("[[A]] ... on reflection [[B]]", "b"),
    ('A, "A"\n\nA: A great answer to the question', "a"), ("B, B", "b"), ("A, B", None),
    # Not verdicts: failures, never guesses.
    ("", None), ("I don't know", None), ("The weather is nice", None), ("A and B", None), ("asdf", None),
    ("Both A and B have issues", None), ("A is better. B is better.", None), ("I prefer a shorter answer.", None),
    ("B does not answer a question", None), ('{"reason": "x"}', None), ("Tip: use salt. A", None),
]


@pytest.mark.parametrize(("text", "expected"), VERDICTS)
def test_parse_verdict(text: str, expected: str | None) -> None:
    assert parse_verdict(text) == expected


def test_combine_both_orders() -> None:
    assert combine("Verdict: A", "Verdict: B").winner == "a"  # second order saw b as "A": it also chose a
    assert combine("[[B]]", "[[A]]").winner == "b"
    assert combine("tie", "tie").winner == "tie"
    flip = combine("Verdict: A", "Verdict: A")  # always the first position: position bias, not a preference
    assert flip.winner == "abstain" and flip.orders == ("a", "b") and not flip.failed
    bad = combine("Verdict: A", "it depends")
    assert bad.failed and "unparseable" in bad.error
    assert combine(CallError("HTTP 500"), "A").error == "HTTP 500"
    assert combine("B", None).winner == "b" and combine("B", None).orders == ("b",)


def test_prompt_template_is_sandboxed(tmp_path: Path) -> None:
    pp = PairPrompt(find_template("pairwise.jinja"), system="You judge.", criteria="brevity")
    msgs = pp.render([{"role": "user", "content": "Boil an egg?"}], "nine minutes", "GREAT QUESTION")
    assert msgs[0] == {"role": "system", "content": "You judge."}
    text = msgs[1]["content"]
    assert text.index("nine minutes") < text.index("GREAT QUESTION") and "brevity" in text
    for evil in ("{{ question.__class__.__mro__ }}", "{{ conversation.append(1) }}", "{{ undefined_name }}"):
        (tmp_path / "evil.jinja").write_text(evil)
        with pytest.raises(ConfigError):
            PairPrompt(tmp_path / "evil.jinja").render([{"role": "user", "content": "q"}], "a", "b")


class LengthSampler:
    """A fake judge model reading the rendered prompt: answers with the shorter response's letter, or always
    'A' (position bias) when `biased`."""

    name = "fake"

    def __init__(self, biased: bool = False) -> None:
        self.biased = biased

    def generate(self, prompts, params, n=1):
        from align.generation import Sample

        out = []
        for chat in prompts:
            text = chat[-1]["content"]
            a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
            b = text.split("[Response B]\n")[1].split("\n\n")[0]
            answer = "Verdict: A" if self.biased or len(a) < len(b) else "Verdict: B" if len(b) < len(a) else "tie"
            out.append([Sample(text=answer, prompt_ids=[], response_ids=[1], finished=True)] * n)
        return out


def test_llm_judge_cancels_position_bias() -> None:
    from align.judges.llm import Config, LLMJudge

    prompts = [[{"role": "user", "content": "q"}]] * 3
    pairs = [("short", "much longer"), ("much longer", "short"), ("same", "same")]
    fair = LLMJudge(Config(), sampler=LengthSampler()).judge(prompts, pairs)
    assert [v.winner for v in fair] == ["a", "b", "tie"]
    biased = LLMJudge(Config(), sampler=LengthSampler(biased=True)).judge(prompts, pairs)
    assert [v.winner for v in biased] == ["abstain"] * 3 and all(v.orders == ("a", "b") for v in biased)
    single = LLMJudge(Config(both_orders=False), sampler=LengthSampler(biased=True)).judge(prompts, pairs)
    assert [v.winner for v in single] == ["a", "a", "a"]


def test_llm_judge_on_a_random_model_fails_instead_of_guessing(tiny_model: Path) -> None:
    from align.generation.select import BackendSettings
    from align.judges.llm import Config, LLMJudge

    judge = LLMJudge(Config(model=str(tiny_model), max_new_tokens=4, engine=BackendSettings(backend="hf",
                                                                                            dtype="float32")))
    verdicts = judge.judge([[{"role": "user", "content": "Boil an egg?"}]], [("Nine minutes.", "Ten minutes.")])
    assert len(verdicts) == 1 and isinstance(verdicts[0], Verdict)
    assert verdicts[0].failed or len(verdicts[0].orders) == 2  # read in both orders, or counted as a failure


def test_every_shipped_spec_loads_against_its_config() -> None:
    from align.config import from_dict
    from align.judges.registry import judge_class

    specs = sorted((ROOT / "judges").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"house_style", "reward_model", "llm", "openai", "demo_ensemble"}
    for path in specs:
        spec = read_spec(path)
        cls = judge_class(spec.kind, spec.source)
        from_dict(cls.Config, spec.options, spec.source)


def test_spec_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("kind: rules\nfunktion: align.judges.house_style:house_style_score\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) funktion; valid keys: function"):
        load_judge(tmp_path / "typo.yaml")
    (tmp_path / "kind.yaml").write_text("kind: oracle\n")
    with pytest.raises(ConfigError, match="unknown judge kind 'oracle'"):
        load_judge(tmp_path / "kind.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_judge("no_such_judge")
    with pytest.raises(ConfigError, match="cannot import"):
        load_judge("no_such_module_xyz:Judge")


def test_house_style_spec_scores_the_style() -> None:
    loaded = load_judge("house_style")
    assert loaded.mode == "score" and loaded.id.startswith("house_style@")
    prompt = [{"role": "user", "content": "How do I store basil?"}]
    good = "Keep basil stems in a glass of water on the counter. Tip: loosely cover the leaves with a bag."
    bad = "Great question! As an AI, I think storing things is important and there are many ways to store things."
    s_good, s_bad = loaded.judge.score([prompt, prompt], [good, bad])
    assert s_good > s_bad


# ---- plug-ins ----

def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "judges/README.md").read_text(), re.DOTALL)


@pytest.fixture
def readme_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The custom judge from judges/README.md, as a module on sys.path, and its spec file."""
    (tmp_path / "my_judges.py").write_text(readme_blocks("python")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_judges", None)
    spec = tmp_path / "concise.yaml"
    spec.write_text(readme_blocks("yaml")[0])
    return spec


def test_readme_custom_judge_loads_by_module_class(readme_plugin: Path) -> None:
    loaded = load_judge(readme_plugin)
    assert loaded.name == "concise" and loaded.mode == "score" and loaded.config["max_words"] == 30
    long = " ".join(["word"] * 40)
    assert loaded.judge.score([[]] * 2, ["Short. Tip: salt.", long]) == pytest.approx([1.0, -1.0])
    direct = load_judge("my_judges:ConciseJudge")
    assert direct.config["max_words"] == 40 and direct.name == "ConciseJudge"


def test_entry_point_plugin(readme_plugin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "my_judges-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-judges\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[align.judges]\nconcise_ep = my_judges:ConciseJudge\n")
    loaded = load_judge("concise_ep")
    assert loaded.kind == "concise_ep" and loaded.mode == "score"
    spec = tmp_path / "ep.yaml"
    spec.write_text("kind: concise_ep\nmax_words: 3\n")
    assert load_judge(spec).config["max_words"] == 3


def test_judge_must_have_exactly_one_interface() -> None:
    class Both:
        def judge(self, prompts, pairs): ...

        def score(self, prompts, responses): ...

    with pytest.raises(TypeError):
        judge_kind(Both())
    with pytest.raises(TypeError):
        judge_kind(object())
    assert judge_kind(ShorterJudge()) == "pairwise"


# ---- the judge stage ----

CALLS = {"n": 0}


def words_score(prompt, response: str) -> float:
    """Test rule: fewer words is better; 'CRASH' makes the rule fail for that response."""
    CALLS["n"] += 1
    if "CRASH" in response:
        raise ValueError("cannot score this")
    return -float(len(response.split()))


def flat(prompt, response: str) -> float:
    return 0.5


class ShorterJudge:
    """Pairwise test judge: the shorter response wins; 'UNSURE' in either response makes it fail."""

    def judge(self, prompts, response_pairs):
        out = []
        for a, b in response_pairs:
            if "UNSURE" in a + b:
                out.append(Verdict("abstain", error="judge could not decide"))
            else:
                out.append(Verdict("a" if len(a) < len(b) else "b" if len(b) < len(a) else "tie", reason="length"))
        return out


def q(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    from align.data.records import prompt_id

    rows = [{"id": prompt_id(q(f"question {i}")), "prompt": q(f"question {i}"), "responses": resp, "generation": {"model": "m"}}
            for i, resp in enumerate([
                ["one two three", "one", "one two"],       # best_worst: "one" over "one two three"
                ["same words here", "same words here"],    # identical: no pair
                ["alpha beta", "gamma delta"],             # equal scores: a tie
                ["short answer", "CRASH long answer here"],  # the rule fails on one response
                ["", "only one real answer"],               # an empty response is not a candidate
            ])]
    return write_jsonl(tmp_path / "samples.jsonl", rows)


def judge_cfg(samples: Path, out: Path, **kw):
    from align.stages.judge import Config

    cfg = load_config(Config, ROOT / "stages/tiny/judge.yaml", [f"samples={samples}", f"output_dir={out}"])
    return dataclasses.replace(cfg, **kw)


def test_judge_stage_with_a_score_judge(samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.data.records import read_preferences
    from align.runs import read_manifest
    from align.stages.judge import run

    spec = tmp_path / "words.yaml"
    spec.write_text("name: words\nkind: rules\nfunction: test_judges:words_score\n")
    CALLS["n"] = 0
    out = run(judge_cfg(samples, tmp_path / "j", judge=str(spec)))
    prefs = read_preferences(out / "preferences.jsonl")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in prefs] == [("one", "one two three")]
    assert prefs[0].meta["source"] == "ai" and prefs[0].meta["judge"].startswith("words@")
    assert prefs[0].meta["scores"] == {"chosen": -1.0, "rejected": -3.0} and prefs[0].meta["margin"] == 2.0
    assert prefs[0].meta["prompt_id"] == json.loads(samples.read_text().splitlines()[0])["id"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["responses"] for f in failures] == [["CRASH long answer here"]]
    m = read_manifest(out)["metrics"]
    assert m["preferences"] == 1 and m["ties"] == 1 and m["failures"] == 1 and m["prompts_without_pair"] == 2
    assert CALLS["n"] == 7  # every distinct non-empty response of a prompt with two or more candidates

    # Re-run in the same folder: everything but the failure comes from the cache.
    CALLS["n"] = 0
    again = run(judge_cfg(samples, tmp_path / "j", judge=str(spec), resume=True))
    assert CALLS["n"] == 1 and read_manifest(again)["metrics"]["cached_judgements"] == 6
    assert (again / "preferences.jsonl").read_text() == (out / "preferences.jsonl").read_text()

    # Spec options can be overridden from the stage: a constant rule ties everything.
    flat = run(judge_cfg(samples, tmp_path / "flat", judge=str(spec), judge_options={"function": "test_judges:flat"}))
    assert read_manifest(flat)["metrics"]["preferences"] == 0 and read_manifest(flat)["metrics"]["ties"] == 3

    # pairing=all with a margin: every pair of the first prompt at least 1 word apart.
    all_pairs = run(judge_cfg(samples, tmp_path / "all", judge=str(spec), pairing="all", min_margin=1.5))
    assert len(read_preferences(all_pairs / "preferences.jsonl")) == 1  # only the 3-vs-1 word pair


def test_judge_stage_with_a_pairwise_plugin_and_human_agreement(samples: Path, tmp_path: Path) -> None:
    from conftest import write_jsonl

    from align.runs import read_manifest
    from align.stages.judge import run

    humans = write_jsonl(tmp_path / "human.jsonl", [
        {"prompt": q("question 0"), "chosen": "ok", "rejected": "a much longer answer"},
        {"prompt": q("h1"), "chosen": "tiny", "rejected": "somewhat longer"},
        {"prompt": q("h2"), "chosen": "the humans liked this long one", "rejected": "short"},
        {"prompt": q("h3"), "chosen": "UNSURE x", "rejected": "y"},
    ])
    out = run(judge_cfg(samples, tmp_path / "j", judge="test_judges:ShorterJudge", human=str(humans)))
    m = read_manifest(out)["metrics"]
    assert m["pairs_judged"] == 5 and m["preferences"] == 5  # 3 pairs + 1 + 1 (the CRASH rule does not apply)
    assert m["human_pairs"] == 4 and m["human_decisive"] == 3
    assert m["human_agreement"] == pytest.approx(2 / 3) and m["human_prompts_in_samples"] == 1
    assert read_manifest(out)["judge"]["mode"] == "pairwise"


def test_ensemble_majority_and_mean(tmp_path: Path) -> None:
    (tmp_path / "words.yaml").write_text("kind: rules\nfunction: test_judges:words_score\n")
    (tmp_path / "shorter.yaml").write_text("kind: test_judges:ShorterJudge\n")
    (tmp_path / "maj.yaml").write_text(f"kind: ensemble\nmode: majority\nmembers: [{tmp_path}/words.yaml, "
                                       f"{tmp_path}/shorter.yaml]\n")
    maj = load_judge(tmp_path / "maj.yaml")
    prompts = [q("x")] * 3
    verdicts = maj.judge.judge(prompts, [("a b", "a b c"), ("CRASH it", "ok"), ("UNSURE", "UNSURE CRASH")])
    assert verdicts[0].winner == "a"          # both members agree
    assert verdicts[1].winner == "b"          # one member failed: the other decides alone
    assert verdicts[2].failed                 # every member failed
    assert len(maj.config["member_configs"]) == 2
    (tmp_path / "mean.yaml").write_text(f"kind: ensemble\nmode: mean\nmembers: [{tmp_path}/words.yaml, "
                                        f"{tmp_path}/words.yaml]\nweights: [1, 3]\nmin_margin: 0.5\n")
    mean = load_judge(tmp_path / "mean.yaml")
    assert [v.winner for v in mean.judge.judge(prompts[:2], [("a", "a b"), ("a b", "c d")])] == ["a", "tie"]
    (tmp_path / "bad.yaml").write_text(f"kind: ensemble\nmode: mean\nmembers: [{tmp_path}/words.yaml, "
                                       f"{tmp_path}/shorter.yaml]\n")
    with pytest.raises(ConfigError, match="score judge"):
        load_judge(tmp_path / "bad.yaml")


def test_verdict_from_scores_margin() -> None:
    assert verdict_from_scores(0.9, 0.5, 0.1).winner == "a"
    assert verdict_from_scores(0.5, 0.9, 0.1).winner == "b"
    assert verdict_from_scores(0.55, 0.5, 0.1).winner == "tie"
    assert verdict_from_scores(0.5, 0.45, 0.05).winner == "a"  # 0.05 apart in floating point is still 0.05


def test_judge_pairs_renders_both_orders_in_one_batch() -> None:
    seen: list[int] = []

    def complete(chats):
        seen.append(len(chats))
        return ["Verdict: A" if "[Response A]\nx" in c[-1]["content"] else "Verdict: B" for c in chats]

    pp = PairPrompt(find_template("pairwise.jinja"))
    verdicts = judge_pairs(complete, pp, [q("1"), q("2")], [("x", "y"), ("y", "x")], both_orders=True)
    assert seen == [4] and [v.winner for v in verdicts] == ["a", "b"]


def test_reward_model_judge(tiny_model: Path, tmp_path: Path, samples: Path) -> None:
    """The reward_model judge on a tiny (untrained) classifier folder: finite scores, deterministic, usable."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    clf.config.pad_token_id = clf.config.eos_token_id
    clf.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    (tmp_path / "rm.yaml").write_text(f"kind: reward_model\npath: {tmp_path / 'rm'}\ndtype: float32\n")
    loaded = load_judge(tmp_path / "rm.yaml")
    prompts = [q("Boil an egg?")] * 2
    first = loaded.judge.score(prompts, ["Nine minutes.", "Ten minutes, then ice."])
    assert all(isinstance(s, float) for s in first) and first != [first[0], first[0]]
    assert loaded.judge.score(prompts, ["Nine minutes.", "Ten minutes, then ice."]) == first
