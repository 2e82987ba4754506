"""X-LoRA (peft.method=xlora): a learned gate over frozen LoRA experts. Two experts trained by ordinary SFT runs on
two toy tasks; the gate trained on both tasks weights them differently per task, and the mixture does both tasks
better than either expert alone. It saves, reloads (experts included) and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError
from align.models.load import chat_ids
from align.models.policy import check_method, load_policy
from align.stages import sft

REPO = Path(__file__).resolve().parent.parent
TASKS = {"colour": ("What colour is item {i}?", "blue blue blue blue."),
         "count": ("How many legs has animal {i}?", "seven seven seven seven.")}


def task_rows(task: str, n: int, start: int = 0) -> list[dict]:
    question, answer = TASKS[task]
    return [{"messages": [{"role": "user", "content": question.format(i=i)},
                          {"role": "assistant", "content": answer}]} for i in range(start, start + n)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model: Path, out: Path, train_rows: list[dict], valid_rows: list[dict], *extra: str) -> Path:
    data = write(out.with_suffix(".train.jsonl"), train_rows), write(out.with_suffix(".valid.jsonl"), valid_rows)
    cfg = load_config(sft.Config, REPO / "stages/tiny/sft.yaml",
                      [f"model={model}", f"output_dir={out}", f"data.train={data[0]}", f"data.validation={data[1]}",
                       "train.progress=false", "train.max_steps=60", "train.eval_steps=60", "train.save_steps=60",
                       "train.lr=3e-2", "data.padding_free=false", *extra])
    return sft.run(cfg)


def answer_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean loss on the assistant tokens of `rows` (one forward each)."""
    losses = []
    with torch.no_grad():
        for r in rows:
            prompt = chat_ids(tokenizer, r["messages"][:1], add_generation_prompt=True)
            ids = chat_ids(tokenizer, r["messages"])
            labels = [-100] * len(prompt) + ids[len(prompt):]
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            losses.append(float(out.loss))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its (tied) embeddings 10x larger. In the random tiny model a token's logit is at most
    |final hidden| x |its embedding| ~ 8 x 0.16, which LoRA cannot change: an expert got from 10.8 nats to ~10 on
    its own task, and the gate's and the mixture's effects were tenths of a nat, up or down with the random stream.
    Here experts reach 2.5-7 nats on their own task and the mixture beats either by about a nat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("xlora_base")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def experts(base, tmp_path_factory, one_thread_module) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {task: train(base, root / task, task_rows(task, 24), task_rows(task, 4, 100)) for task in TASKS}


def test_xlora_is_an_sft_only_unmergeable_adapter():
    caps = check_method("sft", "xlora")
    assert caps.adapter and not caps.mergeable
    with pytest.raises(ConfigError, match="xlora"):
        check_method("dpo", "xlora")


def test_demo_recipe_loads():
    cfg = load_config(sft.Config, REPO / "stages/xlora/sft.yaml")
    assert cfg.peft.method == "xlora" and len(cfg.peft.experts) == 2


def test_xlora_needs_two_lora_experts_on_the_same_base(base, tiny_model_with_bias, experts, tmp_path):
    rows = task_rows("colour", 8)
    with pytest.raises(ConfigError, match="two or more"):
        train(base, tmp_path / "one", rows, rows, "peft.method=xlora", f"peft.experts=[{experts['colour']}]")
    with pytest.raises(ConfigError, match="trained on"):
        train(tiny_model_with_bias, tmp_path / "other-base", rows, rows, "peft.method=xlora",
              f"peft.experts=[{experts['colour']},{experts['count']}]")


SEEDS = (1, 2, 3)  # the gate is trained once per seed; the claims hold for the average over the seeds


def answer_weight(model, tokenizer, rows: list[dict], expert: int) -> float:
    """The gate's mean weight on `expert` over the answer tokens of `rows`."""
    weights = []
    for r in rows:
        prompt = chat_ids(tokenizer, r["messages"][:1], add_generation_prompt=True)
        with torch.no_grad():
            model(input_ids=torch.tensor([chat_ids(tokenizer, r["messages"])]))
        scalings = model.base_model.get_latest_scalings()  # [batch, seq, layers, experts]
        weights.append(float(scalings[0, len(prompt):, :, expert].mean()))
    return sum(weights) / len(weights)


def test_gate_mixes_experts_by_task_and_beats_each_expert(base, experts, tmp_path, one_thread_module):
    mixed_train = [r for pair in zip(task_rows("colour", 24), task_rows("count", 24)) for r in pair]
    held_out = {task: task_rows(task, 6, 200) for task in TASKS}
    both = held_out["colour"] + held_out["count"]
    weight_gaps, mixed_losses = [], []
    for seed in SEEDS:
        run_dir = train(base, tmp_path / f"mix-{seed}", mixed_train, held_out["colour"][:2] + held_out["count"][:2],
                        "peft.method=xlora", f"peft.experts=[{experts['colour']},{experts['count']}]",
                        "train.max_steps=40", "train.lr=1e-2", f"seed={seed}")
        man = json.loads((run_dir / "manifest.json").read_text())
        m = man["metrics"]
        assert man["status"] == "completed" and man["peft"]["method"] == "xlora"
        assert m["trainable_tensors_changed"] == m["trainable_tensors"] > 0 and m["frozen_tensors_changed"] == 0
        # reload from the run folder alone (the experts travel inside it): the trained model, exactly
        mixed = load_policy(run_dir, stage="sft", dtype="float32")
        tok = mixed.tokenizer
        assert (run_dir / "model/experts/0/adapter_model.safetensors").is_file()
        with torch.no_grad():
            probe = mixed.model(input_ids=torch.tensor([man["probe"]["input_ids"]])).logits[0, -1]
        assert torch.allclose(probe[:16], torch.tensor(man["probe"]["logits_head"]), atol=1e-4)
        # expert 0 (colour) minus its weight on count answers: > 0 when the gate tells the tasks apart
        weight_gaps.append(answer_weight(mixed.model, tok, held_out["colour"], 0)
                           - answer_weight(mixed.model, tok, held_out["count"], 0))
        mixed_losses.append(answer_loss(mixed.model, tok, both))
    # the run folder moves (the experts are named relative to it): it still loads, the same model
    moved = tmp_path / "elsewhere" / "mix"
    moved.parent.mkdir()
    run_dir.rename(moved)
    with torch.no_grad():
        again = load_policy(moved, stage="sft", dtype="float32").model(
            input_ids=torch.tensor([man["probe"]["input_ids"]])).logits[0, -1]
    assert torch.equal(again, probe)
    print(f"gate weight gap by task per seed {[round(g, 3) for g in weight_gaps]}; "
          f"mixture loss over both tasks per seed {[round(x, 3) for x in mixed_losses]}")
    assert sum(weight_gaps) / len(SEEDS) > 0.05

    # the mixture does both tasks better than either expert alone (loss over both tasks' held-out answers)
    mixed_loss = sum(mixed_losses) / len(SEEDS)
    for task, folder in experts.items():
        alone = load_policy(folder, stage="sft", dtype="float32").model
        alone_loss = answer_loss(alone, tok, both)
        print(f"loss over both tasks: mixture {mixed_loss:.3f} (mean of {len(SEEDS)} gates), {task} expert alone "
              f"{alone_loss:.3f}")
        assert mixed_loss < alone_loss, task

    # it generates
    prompt = chat_ids(tok, held_out["colour"][0]["messages"][:1], add_generation_prompt=True)
    out = mixed.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(prompt) + 4
