"""`align eval` on tiny models: same seeds give the same samples, KL against the adapter-disabled base,
reward-model means, win rates by score and pairwise judges (both orders), and the written artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from align.config import load_config
from align.errors import ConfigError
from align.judges import Verdict
from align.stages import eval as eval_stage

N_PROMPTS = 4


def fewer_words(prompt: list, response: str) -> float:
    """A rules judge for the tests: shorter is better."""
    return -float(len(response.split()))


class FlipsOrders:
    """A pairwise judge that de-biases itself (as the llm/openai judges do) and finds pure position bias: the
    orders disagree on every pair, so it abstains. Counts its calls."""

    calls = 0

    def judge(self, prompts: list, response_pairs: list) -> list[Verdict]:
        FlipsOrders.calls += len(response_pairs)
        return [Verdict("abstain", reason="orders disagree", orders=("a", "b")) for _ in response_pairs]


def make_adapter(base: Path, out: Path, perturb: float) -> Path:
    """A LoRA adapter on `base`; perturb=0 leaves lora_B at zero (the adapter changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name and perturb:
            p.data.normal_(0.0, perturb)
    model.save_pretrained(out)
    return out


def make_reward_model(base: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(base)
    config.num_labels = 1
    torch.manual_seed(2)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    return {"sft": tiny_model, "zero": make_adapter(tiny_model, root / "zero", 0.0),
            "moved": make_adapter(tiny_model, root / "moved", 0.5),
            "rm": make_reward_model(tiny_model, root / "rm")}


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"How do I keep ingredient {i} fresh?"}]}
            for i in range(N_PROMPTS)]
    return write_jsonl(tmp_path / "eval.jsonl", rows)


def config(tmp_path: Path, prompts: Path, models: dict[str, Path], *extra: str) -> eval_stage.Config:
    return load_config(eval_stage.Config, Path("stages/tiny/eval.yaml"), [
        f"sft={models['sft']}", f"prompts={prompts}", f"reward_model={models['rm']}",
        f"output_dir={tmp_path / 'eval'}", "judge=test_eval:fewer_words", "sampling.max_new_tokens=8",
        f"max_prompts={N_PROMPTS}", *extra])


def test_eval_adapters_kl_rewards_and_outputs(tmp_path: Path, prompts: Path, models: dict[str, Path]) -> None:
    cfg = config(tmp_path, prompts, models, f"policies=[{models['zero']}, {models['moved']}]",
                 "training_judges=[llm]")
    out = eval_stage.run(cfg)
    report = json.loads((out / "eval.json").read_text())
    rows = {r["name"]: r for r in report["policies"]}
    assert list(rows) == ["sft", "zero", "moved"]
    # A zero LoRA is its base model: same samples as SFT (same seeds), KL exactly zero, all ties.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * N_PROMPTS
    text = {(s["policy"], s["index"]): s["response"] for s in samples}
    assert all(text[("zero", i)] == text[("sft", i)] for i in range(N_PROMPTS))
    assert rows["zero"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert rows["zero"]["win_rate"]["ties"] == N_PROMPTS and rows["zero"]["win_rate"]["rate"] == 0.5
    # identical answers: same length, all ties -> the length-controlled win rate is 50% too, not flagged
    assert rows["zero"]["lc_win_rate"]["rate"] == pytest.approx(0.5) and not rows["zero"]["lc_win_rate"]["flag"]
    assert rows["sft"]["lc_win_rate"] is None
    assert rows["zero"]["reward_mean"] == pytest.approx(rows["sft"]["reward_mean"], abs=1e-5)
    # A moved adapter samples differently and sits at a positive KL from its adapter-disabled base.
    assert any(text[("moved", i)] != text[("sft", i)] for i in range(N_PROMPTS))
    assert rows["moved"]["kl_to_reference"] > 0.01
    assert rows["moved"]["reference"].endswith("(SFT)") and report["kl"]["estimator"] == "exact"
    assert rows["sft"]["kl_to_reference"] is None and rows["sft"]["win_rate"] is None  # full-model SFT
    # win counts agree with the judge scores written per sample
    moved = [s for s in samples if s["policy"] == "moved"]
    base = {s["index"]: s["judge"] for s in samples if s["policy"] == "sft"}
    assert rows["moved"]["win_rate"]["wins"] == sum(s["judge"] > base[s["index"]] for s in moved)
    assert rows["moved"]["judge_mean"] == pytest.approx(sum(s["judge"] for s in moved) / N_PROMPTS)
    assert all(isinstance(s["reward"], float) for s in samples)
    assert report["judge"] == {"name": "test_eval:fewer_words", "kind": "score", "training_judges": ["llm"],
                               "differs_from_training_judge": True}
    assert len(report["side_by_side"]) == 3 and set(report["side_by_side"][0]["responses"]) == {"sft", "zero",
                                                                                                "moved"}
    manifest = json.loads((out / "manifest.json").read_text())
    moved_rate = (rows["moved"]["win_rate"]["wins"] + rows["moved"]["win_rate"]["ties"] / 2) / N_PROMPTS
    assert manifest["status"] == "completed" and manifest["metrics"]["moved_win_rate"] == pytest.approx(moved_rate)
    assert rows["moved"]["interval"]["mean"] == pytest.approx(moved_rate)
    assert manifest["metrics"]["zero_win_ties"] == N_PROMPTS


def test_pairwise_judge_is_asked_once_per_pair_and_its_order_flips_are_counted(
        tmp_path: Path, prompts: Path, models: dict[str, Path]) -> None:
    cfg = config(tmp_path, prompts, models, f"policies=[{models['moved']}]", "reward_model=",
                 "judge=test_eval:FlipsOrders", "max_prompts=3")
    FlipsOrders.calls = 0
    report = json.loads((eval_stage.run(cfg) / "eval.json").read_text())
    moved = report["policies"][1]
    # position de-biasing is the judge's: eval asks each pair once and reads the flips from the verdicts
    assert FlipsOrders.calls == 3
    assert moved["win_rate"]["abstains"] == 3 and moved["position_flips"] == 3
    assert moved["reward_mean"] is None and report["judge"]["kind"] == "pairwise"


def test_judge_identities_see_through_names() -> None:
    ids = eval_stage.judge_identities
    house = "align.judges.house_style:house_style_score"
    assert ids("house_style") == {house} == ids(house)  # the shipped rules spec is that function
    assert house in ids("demo_ensemble")  # an ensemble is judged by its members
    assert not ids("llm") & ids(house)


def test_eval_config_errors(tmp_path: Path, prompts: Path, models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="one name per policy"):
        eval_stage.run(config(tmp_path, prompts, models, f"policies=[{models['moved']}]", "names=[a, b]"))
    with pytest.raises(ConfigError, match="not found"):
        eval_stage.run(config(tmp_path, prompts, models, f"policies=[{models['moved']}]", "judge=judges/nope.yaml"))
    with pytest.raises(ConfigError, match="policies is empty"):
        eval_stage.run(config(tmp_path, prompts, models, "policies=[]"))


# ---------------------------------------------------------------- the exact KL

class Bigram:
    """A causal 'LM' whose next-token logits depend only on the last token: logits = table[token]."""

    def __init__(self, table: list[list[float]]) -> None:
        import torch

        self.table = torch.tensor(table).log()  # rows are probabilities
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):  # model_device() asks for one
        yield self.weight

    def __call__(self, input_ids, logits_to_keep: int, **_: object):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])


def test_token_kl_on_a_three_word_vocabulary() -> None:
    import math

    import torch

    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    # KL(p‖q) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2
    assert eval_stage.token_kl(p.log(), q.log()).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    assert eval_stage.token_kl(p.log(), p.log()).item() == 0.0
    # logits are unnormalised: shifting them changes nothing
    assert eval_stage.token_kl(p.log() + 3.0, q.log() - 1.0).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)


def test_exact_sequence_kl_sums_the_per_prefix_kl_along_each_response() -> None:
    import math

    from align.generation import Sample

    policy = Bigram([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    ref = Bigram([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    kl0 = 0.25 * math.log(2)  # after token 0
    kl1 = 0.8 * math.log(8) + 0.1 * math.log(1 / 8)  # after token 1: 0.7 ln 8
    samples = [Sample("", [2, 0], [1, 2], True), Sample("", [0], [1], True), Sample("", [1], [0], True)]
    # sample 1: its response tokens follow 0 then 1; sample 2 follows 0 (padded to width 2); sample 3 follows 1.
    # What was sampled does not enter, only the prefixes: a KL, never negative.
    got = eval_stage.exact_sequence_kl(policy, ref, samples, pad_id=2, chunk=2)
    assert got == pytest.approx([kl0 + kl1, kl0, kl1], abs=1e-6)


def test_exact_sequence_kl_batches_rows_of_similar_length() -> None:
    from align.generation import Sample

    class Recording(Bigram):
        def __call__(self, input_ids, logits_to_keep: int, **kw: object):
            shapes.append(tuple(input_ids.shape))
            return super().__call__(input_ids, logits_to_keep, **kw)

    shapes: list[tuple[int, ...]] = []
    uniform = [[1 / 3] * 3] * 3
    policy, ref = Recording([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]), Recording(uniform)
    long, short = [0, 1, 0, 1, 0], [1]
    samples = [Sample("", [0], long, True), Sample("", [0], short, True), Sample("", [0], long, True),
               Sample("", [0], short, True)]
    got = eval_stage.exact_sequence_kl(policy, ref, samples, pad_id=2, chunk=2)
    # the two short rows share a batch (width 1 + 1), the two long ones the other: no row padded by 4 tokens
    assert sorted(shapes) == [(2, 2), (2, 2), (2, 6), (2, 6)]
    alone = [eval_stage.exact_sequence_kl(policy, ref, [s], pad_id=2, chunk=1)[0] for s in samples]
    assert got == pytest.approx(alone, abs=1e-6) and got[0] != pytest.approx(got[1])


def test_a_stacked_adapter_is_measured_against_sft_not_its_own_base(
        tmp_path: Path, prompts: Path, models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from align.models.policy import point_adapter_at

    # "stacked" = a zero adapter trained on top of "moved" (as online round 2 sits on round 1): it IS the moved
    # policy, so its KL to SFT equals moved's; its adapter-disabled base (moved) would have given 0.
    stacked = make_adapter(models["sft"], tmp_path / "stacked", 0.0)
    point_adapter_at(stacked, models["moved"])
    AutoTokenizer.from_pretrained(models["sft"]).save_pretrained(stacked)  # stages save one with every adapter
    assert eval_stage.adapter_chain(stacked) == [stacked, models["moved"].resolve(), models["sft"].resolve()]
    cfg = config(tmp_path, prompts, models, f"policies=[{models['moved']}, {stacked}]", "reward_model=",
                 "max_prompts=2", "sampling_seeds=[5, 6]")
    report = json.loads((eval_stage.run(cfg) / "eval.json").read_text())
    rows = {r["name"]: r for r in report["policies"]}
    assert rows["stacked"]["reference"] == rows["moved"]["reference"] and rows["moved"]["kl_to_reference"] > 0.01
    assert rows["stacked"]["kl_to_reference"] == pytest.approx(rows["moved"]["kl_to_reference"], rel=1e-4)
    # two sampling seeds: every prompt twice, the cells named in samples.jsonl
    assert report["sampling_seeds"] == [5, 6] and rows["moved"]["win_rate"]["n"] + rows["moved"]["win_rate"][
        "abstains"] == 4
    cells = [(json.loads(x)["sampling_seed"], json.loads(x)["prompt_index"])
             for x in (Path(cfg.output_dir) / "samples.jsonl").read_text().splitlines()[:4]]
    assert cells == [(5, 0), (5, 1), (6, 0), (6, 1)]


def test_system_prompt_reaches_every_rendered_prompt(tmp_path: Path, prompts: Path, models: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    sampled: list = []  # every Sample eval draws, with the token ids the model was given
    real = eval_stage.sample_all

    def recording(*args: object) -> list:
        got = real(*args)
        sampled.extend(got)
        return got

    monkeypatch.setattr(eval_stage, "sample_all", recording)
    cfg = config(tmp_path, prompts, models, f"policies=[{models['zero']}]", "reward_model=",
                 "sampling.max_new_tokens=2", "system_prompt=Answer like a pirate.")
    out = eval_stage.run(cfg)
    tokenizer = AutoTokenizer.from_pretrained(models["sft"])
    assert len(sampled) == 2 * N_PROMPTS  # sft and zero, every prompt once
    assert all("Answer like a pirate." in tokenizer.decode(s.prompt_ids) for s in sampled)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["prompt"][0] == {"role": "system", "content": "Answer like a pirate."} for r in rows)


def test_policies_are_merged_and_prepacked_for_eval_and_prompt_learning_stays_live(
        models: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.models.prepacked import PrepackedLinear, prepacking_is_faster

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    model, _ = eval_stage.load_policy(models["moved"], "float32", False)
    assert not isinstance(model, PeftModel) and not any("lora" in name for name, _ in model.named_modules())
    assert any(isinstance(m, PrepackedLinear) for m in model.modules()) == prepacking_is_faster(torch.float32)
    live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), models["moved"]).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, live(input_ids=ids).logits, atol=1e-4)
    prompt_tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt_tuned.save_pretrained(tmp_path / "prompt")
    model, _ = eval_stage.load_policy(tmp_path / "prompt", "float32", False)
    assert isinstance(model, PeftModel) and model.peft_config["default"].is_prompt_learning


def test_sampling_batch_by_batch_gives_the_samples_of_one_call(models: dict[str, Path]) -> None:
    """eval samples one batch at a time (for its progress bar) with the seed the sampler gives a batch at that
    offset: the samples are exactly those of one call over every prompt."""
    import dataclasses

    from align.generation.hf import HFSampler
    from align.models.load import load_model, load_tokenizer

    model, tokenizer = load_model(models["sft"], dtype="float32"), load_tokenizer(models["sft"])
    prompts = [[{"role": "user", "content": f"Tip {i} for storing herbs?"}] for i in range(5)]
    cfg = dataclasses.replace(eval_stage.Config(), sampling=dataclasses.replace(
        eval_stage.Config().sampling, batch_size=2, max_new_tokens=6), sampling_seeds=[3, 8])
    whole = [g[0] for seed in (3, 8) for g in HFSampler(model, tokenizer).generate(
        prompts, dataclasses.replace(cfg.sampling, seed=seed), n=1)]
    got = eval_stage.sample_all(model, tokenizer, prompts, cfg)
    assert [s.response_ids for s in got] == [s.response_ids for s in whole]
    assert len({tuple(s.response_ids) for s in got}) > 1  # sampled, not one repeated answer
