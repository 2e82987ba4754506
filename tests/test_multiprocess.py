"""Every training stage under `accelerate launch` with 2 CPU processes (gloo), as the README's "Scaling out" shows:
the data is split, gradients are averaged, only the main process writes the run folder, metrics are reduced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
ROWS = 8  # distinct training rows: 2 processes x batch 2 x 2 steps is one epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, args: list[str], processes: int = 2) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --config_file stages/accelerate/cpu2.yaml -m align.cli <stage> <tiny recipe> ...`."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "stages/accelerate/cpu2.yaml"),
           "--main_process_port", str(free_port()), "--num_processes", str(processes),
           "-m", "align.cli", stage, str(REPO / "stages/tiny" / f"{stage}.yaml"), *args]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 distinct rows ("item N" names each) and a validation file whose rows say "check" instead."""
    tmp = tmp_path_factory.mktemp("mp")

    def rows(word: str) -> list[dict]:
        colours = ["blue", "green", "amber", "violet", "white", "black", "pink", "grey"]
        return [{"prompt": [{"role": "user", "content": f"What colour is {word} {i}?"}],
                 "chosen": [{"role": "assistant", "content": f"{colours[i]} {colours[i]}."}],
                 "rejected": [{"role": "assistant", "content": f"red, not {colours[i]}."}]} for i in range(ROWS)]

    train, check = rows("item"), rows("check")
    return {"prefs": write_jsonl(tmp / "prefs.jsonl", train), "prefs_val": write_jsonl(tmp / "prefs_val.jsonl", check),
            "sft": write_jsonl(tmp / "sft.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in train]),
            "sft_val": write_jsonl(tmp / "sft_val.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in check])}


def stage_args(stage: str, model: Path, files: dict[str, Path], out: Path) -> list[str]:
    train = ["train.max_steps=2", "train.batch_size=2", "train.logging_steps=1", "train.save_steps=2",
             "train.progress=false", f"output_dir={out}"]
    return {
        "sft": [f"model={model}", f"data.train={files['sft']}", f"data.validation={files['sft_val']}",
                "train.eval_steps=0", *train],
        "reward": [f"model={model}", f"data.train={files['prefs']}", f"data.validation={files['prefs_val']}",
                   "train.eval_steps=0", *train],
        "dpo": [f"policy={model}", f"data.train={files['prefs']}", "data.validation=", *train],
        "grpo": [f"policy={model}", "reward.function=conftest:count_e", "online.num_generations=2",
                 "online.max_completion_length=4", *train],
        "rloo": [f"policy={model}", "reward.function=conftest:count_e", "online.num_generations=2",
                 "online.max_completion_length=4", *train],
        "ppo": [f"policy={model}", "reward.function=conftest:count_e", "ppo.steps=2", "ppo.batch_size=4",
                "ppo.mini_batch_size=4", "data.eval_size=0", "sampling.max_new_tokens=4", "log.save_every=2",
                "log.progress=false", f"output_dir={out}"],
    }[stage]


def check_two_process_run(out: Path, stage: str, steps: int) -> None:
    """A completed 2-process run of `steps` steps: one manifest saying 2 processes, the model, one RNG state per
    process in the last checkpoint, and metrics / TensorBoard written by the main process only."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    assert any((out / "model").glob("*.safetensors"))
    if stage == "ppo":  # our loop: one RNG state per process in each checkpoint, one metrics row per step
        ckpt = out / "checkpoints" / f"step-{steps}"
        assert sorted(p.name for p in ckpt.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == steps
    else:  # TRL's Trainer: 2 processes x 2 examples a step; TensorBoard from the main process
        state = json.loads((out / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        assert state["global_step"] == steps
        assert sorted(p.name for p in (out / "checkpoints" / f"checkpoint-{steps}").glob("rng_state*.pth")) == [
            "rng_state_0.pth", "rng_state_1.pth"]
        writers = {p.name.split(".")[-2] for p in (out / "tb").rglob("events.out.tfevents.*")}  # ...<pid>.<n>
        assert len(writers) == 1  # TensorBoard is written by the main process only


@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo"])  # sft, reward, dpo: the next test
def test_two_processes(stage: str, tiny_model: Path, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    launch(stage, stage_args(stage, tiny_model, files, out))
    check_two_process_run(out, stage, steps=2)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_each_process_trains_on_its_own_shard_of_the_epoch(stage: str, tiny_model: Path, files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """8 distinct rows, 2 processes x batch 2 x 2 steps = one epoch: the ranks' training batches are disjoint and
    together hold every row once (read from the batches each process's data loader yielded, see `probe`)."""
    args = [f"data.validation={files['prefs_val']}" if a == "data.validation=" else a  # no split of the train rows
            for a in stage_args(stage, tiny_model, files, tmp_path / "run")]
    seen = launch_probed(stage, args, tmp_path, tiny_model)
    assert set(seen) == {0, 1}
    assert all(len(rows) == 4 for rows in seen.values()), seen  # 2 steps x batch 2 each
    assert not set(seen[0]) & set(seen[1]), seen  # different shards
    assert sorted(seen[0] + seen[1]) == list(range(ROWS)), seen  # the whole epoch


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_processes_with_half_the_batch_take_the_step_one_process_takes(stage: str, tiny_model: Path,
                                                                          files: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Same distinct rows, 1 process x batch 4 vs 2 processes x batch 2: the same first-step loss and gradient norm,
    so the gradients were averaged over both processes (sft and reward evaluate before training, which once left
    the model without DistributedDataParallel: each process stepped on its own gradients, grad norm 1.010 vs 0.916).
    Not the weights: Adam's first step divides each gradient by its own size, so float noise in near-zero gradient
    entries moves weights by up to the learning rate."""
    def args(out: Path, batch: int) -> list[str]:
        return [a for a in stage_args(stage, tiny_model, files, out)
                if not a.startswith(("train.batch_size", "train.max_steps", "train.save_steps"))] + [
            f"train.batch_size={batch}", "train.max_steps=1", "train.save_steps=1", "peft.dropout=0.0"]

    launch(stage, args(tmp_path / "one", 4), processes=1)
    launch(stage, args(tmp_path / "two", 2), processes=2)
    check_two_process_run(tmp_path / "two", stage, steps=1)
    step = [next(e for e in json.loads((tmp_path / d / "checkpoints/checkpoint-1/trainer_state.json").read_text())
                 ["log_history"] if "loss" in e) for d in ("one", "two")]
    assert step[0]["loss"] == pytest.approx(step[1]["loss"], abs=1e-4)
    assert step[0]["grad_norm"] == pytest.approx(step[1]["grad_norm"], rel=1e-4)
    assert step[0]["grad_norm"] > 0


PPO_COMMON = ["reward.function=conftest:count_e", "ppo.steps=1", "data.eval_size=0", "sampling.max_new_tokens=6",
              "log.save_every=1", "log.progress=false", "engine.dtype=float32", "kl.reference_dtype=float32"]


def test_ppo_on_two_processes_takes_the_step_one_process_takes(tiny_model: Path, tmp_path: Path) -> None:
    """1 process x 8 prompts and 2 processes x 4 (the same 8 prompts, each sampled from its own random stream):
    advantages whitened over all 8 rollouts and losses normalised by all their tokens give the same first update
    and the same logged metrics. Per-process whitening or per-process loss means would not."""
    launch("ppo", [f"policy={tiny_model}", *PPO_COMMON, "ppo.batch_size=8", "ppo.mini_batch_size=8",
                   f"output_dir={tmp_path / 'one'}"], processes=1)
    launch("ppo", [f"policy={tiny_model}", *PPO_COMMON, "ppo.batch_size=4", "ppo.mini_batch_size=4",
                   f"output_dir={tmp_path / 'two'}"], processes=2)
    one, two = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("one", "two"))
    for key in ("reward/mean", "reward/std", "kl/ref", "response/length", "entropy", "loss/policy", "loss/value",
                "policy/clipfrac", "value/explained_variance", "sampler/logprob_absdiff"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step-1" / "trainable.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]
    assert moved and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max(
        float((a[k] - b[k]).abs().max()) for k in a)


# ---- which rows each process trained on ----


def launch_probed(stage: str, args: list[str], tmp_path: Path, tokenizer: Path) -> dict[int, list[int]]:
    """Launch `stage` on 2 processes through this module's __main__ (align.cli with `probe` installed); returns
    {rank: row numbers of every training batch it drew}."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "stages/accelerate/cpu2.yaml"),
           "--main_process_port", str(free_port()), "--num_processes", "2", "-m", "test_multiprocess", stage,
           str(REPO / "stages/tiny" / f"{stage}.yaml"), *args]
    env = ENV | {"ALIGN_PROBE": str(probe_dir), "ALIGN_PROBE_TOKENIZER": str(tokenizer)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return {int(p.stem.split("-")[1]): [int(x) for x in p.read_text().split()] for p in probe_dir.glob("rank-*")}


def probe() -> None:
    """Record the row number ("item N") of every row in every batch accelerate's data loaders yield on this
    process, into $ALIGN_PROBE/rank-<rank>.txt (validation rows say "check", so they are not counted; a padding-free batch packs several rows in one)."""
    import re

    from accelerate.data_loader import DataLoaderShard
    from transformers import AutoTokenizer

    out = Path(os.environ["ALIGN_PROBE"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
    tokenizer: list = []
    original = DataLoaderShard.__iter__

    last: list = [None]

    def iterate(self):
        for batch in original(self):
            if not tokenizer:
                tokenizer.append(AutoTokenizer.from_pretrained(os.environ["ALIGN_PROBE_TOKENIZER"]))
            ids = batch[next(k for k in batch if k.endswith("input_ids"))]  # sft: input_ids; dpo: prompt_input_ids
            # dict.fromkeys: dpo's input_ids hold each prompt twice (chosen rows, then rejected rows)
            found = list(dict.fromkeys(int(m) for row in ids for m in re.findall(r"item (\d+)\b",
                                                                                 tokenizer[0].decode(row))))
            if found != last[0]:  # a loader wrapped in another yields each batch at both levels: count it once
                with open(out, "a") as f:
                    f.write("".join(f"{n}\n" for n in found))
            last[0] = found
            yield batch

    DataLoaderShard.__iter__ = iterate


if __name__ == "__main__":  # `-m test_multiprocess STAGE RECIPE ...`: align.cli with the probe installed
    probe()
    from align.cli import main

    sys.exit(main(sys.argv[1:]))


def _wrapping_depth(fn) -> int:
    depth = 0
    while hasattr(fn, "__wrapped__"):
        fn, depth = fn.__wrapped__, depth + 1
    return depth


def test_an_evaluation_before_training_leaves_the_model_for_train_to_prepare(tiny_model: Path,
                                                                             tmp_path: Path) -> None:
    """`evaluate_before_training` undoes what the evaluation's preparation did (accelerate's prepared mark, its
    registration, its bf16 autocast forward), so `train()` prepares the model exactly as with no evaluation first:
    wrapped in DDP under several processes (the test above), one autocast layer in bf16."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from align.training import evaluate_before_training

    rows = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4)
    depths = []
    for evaluate_first in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        args = TrainingArguments(str(tmp_path / f"t{evaluate_first}"), bf16=True, max_steps=1, report_to="none",
                                 per_device_train_batch_size=2, per_device_eval_batch_size=2, use_cpu=True,
                                 save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
        if evaluate_first:
            assert "eval_loss" in evaluate_before_training(trainer)
            assert not getattr(trainer.model, "_is_accelerate_prepared", False)
            assert trainer.model not in trainer.accelerator._models
        trainer.train()
        depths.append(_wrapping_depth(trainer.model.forward))
    assert depths[0] == depths[1] > 0, depths
