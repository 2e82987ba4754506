"""Reward stage and the RewardModel scoring API, on a tiny random model and a trivially learnable toy preference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from align.config import load_config
from align.errors import AlignError
from align.reward_model import (
    RewardModel,
    bt_log_loss,
    calibration_table,
    encode,
    expected_calibration_error,
    mean_margin,
    pairwise_accuracy,
    reward_stats,
)
from align.stages import reward, score

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread is faster

REPO = Path(__file__).resolve().parent.parent
FOODS = ["rice", "pasta", "garlic", "onion", "salmon", "tofu", "lentils", "spinach", "carrots", "eggs", "beef",
         "chicken", "potatoes", "mushrooms", "quinoa", "beans", "cabbage", "leeks", "shrimp", "oats", "peas", "corn",
         "barley", "squash", "kale", "pork", "lamb", "cod", "tomatoes", "peppers"]
STYLES = ["boil", "roast", "fry", "steam"]


def toy_pairs(foods: list[str]) -> list[dict]:
    """Chosen always ends with a 'Tip:' sentence; rejected opens with filler and never has one."""
    rows = []
    for food in foods:
        for style in STYLES[:2]:
            rows.append({"prompt": [{"role": "user", "content": f"How do I {style} {food}?"}],
                         "chosen": [{"role": "assistant", "content": f"{style.title()} the {food} gently. "
                                                                     f"Tip: salt it first."}],
                         "rejected": [{"role": "assistant", "content": f"Great question! As an AI, I think {food} "
                                                                       f"is lovely, really lovely."}],
                         "meta": {"margin": 0.5}})
    return rows



@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("toy_prefs")
    return write_jsonl(d / "train.jsonl", toy_pairs(FOODS[:24])), write_jsonl(d / "valid.jsonl", toy_pairs(FOODS[24:]))


@pytest.fixture(scope="module")
def small_files(toy_files: tuple[Path, Path]) -> tuple[Path, Path]:
    """The toy train file with a 2-pair validation file, for tests that only need a run to happen."""
    return toy_files[0], write_jsonl(toy_files[1].with_name("small_valid.jsonl"), toy_pairs(FOODS[24:25]))


def tiny_cfg(model: Path, train: Path, valid: Path | str, out: Path, *extra: str) -> reward.Config:
    return load_config(reward.Config, REPO / "stages/tiny/reward.yaml",
                       [f"model={model}", f"data.train={train}", f"data.validation={valid}", f"output_dir={out}",
                        *extra])


@pytest.fixture(scope="module")
def trained(tiny_model: Path, toy_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reward.run(tiny_cfg(tiny_model, *toy_files, tmp_path_factory.mktemp("rm") / "run"))


# ---- metric functions against hand-computed numbers ----

def test_metric_functions_match_hand_computation() -> None:
    chosen, rejected = [2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0]
    assert pairwise_accuracy(chosen, rejected) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert mean_margin(chosen, rejected) == pytest.approx((1 - 1 + 0 + 3) / 4)
    mean, std = reward_stats([1.0, 3.0])
    assert (mean, std) == (pytest.approx(2.0), pytest.approx(1.0))
    assert bt_log_loss([1.0], [1.0]) == pytest.approx(math.log(2))
    # margins 1, -1, 0, 3 -> p = σ(1)=.731, σ(-1)=.269, .5, σ(3)=.953; confidence .731, .731, .5, .953
    table = calibration_table(chosen, rejected, bins=5)  # bins [.5,.6) [.6,.7) [.7,.8) [.8,.9) [.9,1]
    assert [row["count"] for row in table] == [1, 0, 2, 0, 1]
    s1 = 1 / (1 + math.exp(-1))
    assert table[2]["confidence"] == pytest.approx(s1) and table[2]["accuracy"] == pytest.approx(0.5)
    assert table[0]["accuracy"] == pytest.approx(0.5) and table[4]["accuracy"] == 1.0
    s3 = 1 / (1 + math.exp(-3))
    ece = (1 * abs(0.5 - 0.5) + 2 * abs(0.5 - s1) + 1 * abs(1.0 - s3)) / 4
    assert expected_calibration_error(table) == pytest.approx(ece)
    with pytest.raises(ValueError):
        pairwise_accuracy([1.0], [])


# ---- training, saving, scoring ----

def test_toy_preference_is_learned(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    m = manifest["metrics"]
    assert m["heldout_accuracy"] > 0.9, m
    assert m["heldout_margin_mean"] > 0 and math.isfinite(m["train_loss"])
    assert m["heldout_margin_mean"] > m["eval_margin_before"] + 1.0  # learned, not a lucky random head
    assert manifest["outputs"]["model"] == "model" and manifest["outputs"]["adapter"] == "adapter"
    calibration = json.loads((trained / "calibration.json").read_text())
    assert sum(row["count"] for row in calibration["bins"]) == m["heldout_pairs"] == 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (trained / "tb").glob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"heldout/accuracy", "heldout/ece", "heldout/margin_mean", "heldout/reward_std"} <= tags, tags


def test_scores_equal_plain_transformers_and_peft(trained: Path, tiny_model: Path, toy_files: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in toy_files[1].read_text().splitlines()][:6]
    prompts = [r["prompt"] for r in rows] + ["How do I roast cod?"]
    responses = [r["chosen"][0]["content"] for r in rows] + ["Roast it. Tip: oil the pan."]
    ours = RewardModel.load(trained, batch_size=4).score(prompts, responses)
    assert RewardModel.load(trained / "model").score(prompts, responses) == pytest.approx(ours, abs=1e-5)
    empty = RewardModel.load(trained).score(["How do I roast cod?"], [""])  # an empty generation still scores
    assert len(empty) == 1 and math.isfinite(empty[0])

    tok = AutoTokenizer.from_pretrained(trained / "model")
    plain = AutoModelForSequenceClassification.from_pretrained(trained / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    with_adapter = PeftModel.from_pretrained(base, trained / "adapter").eval()
    for model in (plain, with_adapter):
        theirs = []
        for p, r in zip(prompts, responses):
            msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [
                {"role": "assistant", "content": r}]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                theirs.append(model(input_ids=ids).logits[0, 0].item())
        assert theirs == pytest.approx(ours, abs=1e-4)


def test_scoring_runs_packed_rows_with_shared_prompts_computed_once(trained: Path) -> None:
    import torch

    from align.models.packed import common_prefix
    from align.reward_model import encode

    prompts = [[{"role": "user", "content": f"How do I {verb} {food}?"}] for verb, food in
               (("roast", "cod"), ("poach", "eggs")) for _ in range(4)]
    # answer lengths interleave the two prompts: batched by length, each batch of 4 would hold both prompts
    words = ["Heat", "well", "then", "add", "some", "salt", "and", "more", "pepper"]
    responses = [" ".join(words[: 2 * i + 1 + (j >= 4)]) for j in range(8) for i in [j % 4]]
    packed, padded = RewardModel.load(trained, batch_size=4), RewardModel.load(trained, batch_size=4)
    padded.packed = False
    want = padded.score(prompts, responses)
    assert packed.score(prompts, responses) == pytest.approx(want, abs=1e-5) and packed.packed
    seen: list[int] = []
    hook = packed.model.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        assert packed.score(prompts[::-1], responses[::-1]) == pytest.approx(want[::-1], abs=1e-5)
    finally:
        hook.remove()
    ids = [encode(packed.tokenizer, p, [{"role": "assistant", "content": r}]) for p, r in zip(prompts, responses)]
    shared = common_prefix(torch.tensor(ids[0]), torch.tensor(ids[1]))  # one prompt's answers share this much
    assert shared > 20
    # batched in token order, a batch per prompt: each computes its shared first tokens once (3 x 2 copies saved)
    assert len(seen) == 2 and sum(seen) <= sum(map(len, ids)) - 6 * shared


def test_sft_adapter_base_is_merged_and_materialized(tiny_model: Path, small_files: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """The default base is the SFT run: a causal-LM LoRA adapter. It is merged for training and saved as base/."""
    import peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = tmp_path / "sft"
    lm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), peft.LoraConfig(
        r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
    lm.save_pretrained(sft)
    config = json.loads((sft / "adapter_config.json").read_text())
    (sft / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tiny_model)}))
    out = reward.run(tiny_cfg(sft, *small_files, tmp_path / "run", "train.max_steps=2"))
    assert json.loads((out / "manifest.json").read_text())["outputs"]["base"] == "base"
    # the base sits in the same run folder: named relative to the adapter, so the run folder can move
    assert json.loads((out / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    prompt, response = "How do I fry kale?", "Fry it hot. Tip: dry it first."
    ours = RewardModel.load(out).score([prompt], [response])[0]
    rm = RewardModel(PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(out / "base"), out / "adapter").eval(),
        RewardModel.load(out).tokenizer)
    assert rm.score([prompt], [response])[0] == pytest.approx(ours, abs=1e-4)
    # the SFT adapter really was merged: the saved base differs from the raw tiny model
    raw = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).model.layers[0].mlp.up_proj
    merged = AutoModelForSequenceClassification.from_pretrained(out / "base").model.layers[0].mlp.up_proj
    assert not torch.allclose(raw.weight, merged.weight)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_full_and_qlora_save_plain_classifiers(method: str, tiny_model: Path, small_files: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    out = reward.run(tiny_cfg(tiny_model, *small_files, tmp_path / "run", f"peft.method={method}",
                              "train.max_steps=2"))
    assert (out / "adapter").is_dir() == (method == "qlora")
    rm = RewardModel.load(out)
    plain = RewardModel(AutoModelForSequenceClassification.from_pretrained(out / "model").eval(), rm.tokenizer)
    prompt, response = "How do I fry kale?", "Fry it hot. Tip: dry it first."
    assert plain.score([prompt], [response]) == pytest.approx(rm.score([prompt], [response]), abs=1e-5)
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    after = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert not torch.allclose(before.model.layers[1].mlp.down_proj.weight, after.model.layers[1].mlp.down_proj.weight)


def test_score_stage_writes_scores(trained: Path, tmp_path: Path) -> None:
    rows = [{"prompt": "How do I fry kale?", "response": "Fry it hot. Tip: dry it first.", "meta": {"id": 1}},
            {"prompt": [{"role": "user", "content": "How do I fry kale?"}],
             "response": "Great question! As an AI, I think kale is lovely, really lovely."}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = load_config(score.Config, REPO / "stages/score.yaml",
                      [f"model={trained}", f"input={inp}", f"output_dir={tmp_path / 'score'}"])
    out = score.run(cfg)
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["meta"] for s in scored[:1]] == [{"id": 1}]
    expected = RewardModel.load(trained).score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [s["score"] for s in scored] == pytest.approx(expected, abs=1e-5)
    assert scored[0]["score"] > scored[1]["score"]


# ---- data handling and errors ----

def test_validation_split_from_train_is_by_prompt(tiny_model: Path, toy_files: tuple[Path, Path]) -> None:
    cfg = tiny_cfg(tiny_model, toy_files[0], "", Path("unused"), "data.validation_fraction=0.25")
    _, val_path, train, val = reward.load_pairs(cfg)
    assert val_path is None and len(train) + len(val) == 48 and len(val) == 12
    assert not {json.dumps(r.prompt) for r in train} & {json.dumps(r.prompt) for r in val}
    assert [r.prompt for r in reward.load_pairs(cfg)[3]] == [r.prompt for r in val]  # deterministic


def test_import_run_folder_as_data(toy_files: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil
    from dataclasses import dataclass

    from align.runs import start_run

    @dataclass(frozen=True)
    class Fake:
        output_dir: str

    folder = tmp_path / "import"
    shutil.copy(toy_files[0], tmp_path / "train.jsonl")
    with pytest.raises(AlignError, match="without an align manifest"):  # a plain folder is not a run folder
        reward.resolve_data(str(tmp_path), ("train", "preferences"))
    run_ = start_run("import", Fake(str(folder)))
    shutil.copy(toy_files[0], folder / "train.jsonl")
    run_.add_output("train", folder / "train.jsonl")
    run_.write_manifest("failed")
    with pytest.raises(AlignError, match="status 'failed'"):  # a failed import is not preference data
        reward.resolve_data(str(folder), ("train", "preferences"))
    run_.finish()
    assert reward.resolve_data(str(folder), ("train", "preferences")) == folder / "train.jsonl"
    with pytest.raises(AlignError, match="no valid or validation output"):
        reward.resolve_data(str(folder), ("valid", "validation"))
    sft_run = start_run("sft", Fake(str(tmp_path / "sft")))
    sft_run.finish()
    with pytest.raises(AlignError, match="is a sft run"):
        reward.resolve_data(str(tmp_path / "sft"), ("train",))


def test_margin_column_from_meta(tiny_model: Path, toy_files: tuple[Path, Path]) -> None:
    from align.data.records import read_preferences
    from align.models.load import load_tokenizer

    records = read_preferences(toy_files[1])
    tok = load_tokenizer(tiny_model)
    rows, dropped = reward.tokenize_pairs(records, tok, reward.DataSettings(max_length=256), "x", use_margin=True)
    assert dropped == 0 and {r["margin"] for r in rows} == {0.5}
    assert rows[0]["chosen_ids"] == encode(tok, records[0].prompt, records[0].chosen)
    rows, _ = reward.tokenize_pairs(records, tok, reward.DataSettings(max_length=256), "x", use_margin=False)
    assert "margin" not in rows[0]


def test_zero_usable_pairs_is_an_error(tiny_model: Path, toy_files: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model, *toy_files, tmp_path / "run", "data.max_length=8")
    with pytest.raises(AlignError, match="no usable preference pairs"):
        reward.run(cfg)
    assert not (tmp_path / "run").exists()


def test_base_without_chat_template_is_an_error(tiny_model: Path, toy_files: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "no_template"
    shutil.copytree(tiny_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(plain)
    assert not tok.chat_template, "fixture still has a chat template"
    with pytest.raises(AlignError, match="no chat template"):
        reward.run(tiny_cfg(plain, *toy_files, tmp_path / "run"))


def test_tokenizer_larger_than_embeddings_is_an_error(tokenizer_dir: Path, toy_files: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small_vocab"
    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(small)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(small)
    with pytest.raises(AlignError, match="embedding table has 1000 rows"):
        reward.run(tiny_cfg(small, *toy_files, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_recipes_load() -> None:
    for path in (REPO / "stages/reward.yaml", REPO / "stages/tiny/reward.yaml"):
        load_config(reward.Config, path)
    load_config(score.Config, REPO / "stages/score.yaml")


# ---- free baselines ----

def test_baseline_accuracies_and_the_warning_by_hand() -> None:
    from align.reward_model import baseline_accuracies, baseline_warning

    # log-likelihood: pairs 1 and 3 prefer chosen, pair 2 rejected, pair 4 ties -> (1 + 0 + 1 + 0.5) / 4
    # length: chosen longer in pair 2 only, pair 4 the same length -> (0 + 1 + 0 + 0.5) / 4
    acc = baseline_accuracies([-5.0, -9.0, -2.0, -4.0], [-6.0, -3.0, -7.0, -4.0], [10, 30, 5, 8], [20, 12, 9, 8])
    assert acc == {"loglik_ratio": pytest.approx(0.625), "longer_wins": pytest.approx(0.375)}
    assert baseline_warning(0.7, acc) is None
    line = baseline_warning(0.6, acc)
    assert "loglik ratio (0.625)" in line and "longer" not in line and "\n" not in line
    assert "longer wins (0.375)" in baseline_warning(0.375, acc)  # equal is not better


def test_response_logprobs_sum_the_response_tokens(tiny_model: Path, toy_files: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.records import read_preferences
    from align.models.load import chat_ids
    from align.reward_model import response_logprobs

    lm, tok = AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    records = read_preferences(toy_files[1])[:3]
    chosen, rejected = response_logprobs(lm, tok, records, batch_size=2)
    for r, got in zip(records, rejected):  # by hand: one unpadded forward, the log-softmax at each response token
        head = chat_ids(tok, r.prompt, add_generation_prompt=True)
        full = encode(tok, r.prompt, r.rejected)
        assert full[:len(head)] == head
        with torch.no_grad():
            logp = lm(torch.tensor([full])).logits[0].log_softmax(-1)
        want = sum(logp[i - 1, full[i]].item() for i in range(len(head), len(full)))
        assert got == pytest.approx(want, abs=1e-4)
    assert len(chosen) == 3 and all(c < 0 for c in chosen)


def test_reward_stage_reports_its_free_baselines(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    m = manifest["metrics"]
    # every toy chosen answer ("Boil the rice gently. Tip: salt it first.") is shorter than its rejected one
    assert m["heldout_baseline_longer_wins_accuracy"] == 0.0
    assert manifest["baselines"]["accuracy"]["loglik_ratio"] == m["heldout_baseline_loglik_ratio_accuracy"]
    assert manifest["baselines"]["beats_both"] is (m["heldout_accuracy"] > max(
        m["heldout_baseline_longer_wins_accuracy"], m["heldout_baseline_loglik_ratio_accuracy"]))
