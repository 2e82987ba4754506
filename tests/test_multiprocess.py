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
    tmp = tmp_path_factory.mktemp("mp")
    rows = [{"prompt": [{"role": "user", "content": "What colour is the item?"}],
             "chosen": [{"role": "assistant", "content": "blue blue blue."}],
             "rejected": [{"role": "assistant", "content": "red red red."}]} for _ in range(16)]
    return {"prefs": write_jsonl(tmp / "prefs.jsonl", rows),
            "sft": write_jsonl(tmp / "sft.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in rows])}


def stage_args(stage: str, model: Path, files: dict[str, Path], out: Path) -> list[str]:
    train = ["train.max_steps=2", "train.batch_size=2", "train.logging_steps=1", "train.save_steps=2",
             "train.progress=false", f"output_dir={out}"]
    return {
        "sft": [f"model={model}", f"data.train={files['sft']}", f"data.validation={files['sft']}",
                "train.eval_steps=0", *train],
        "reward": [f"model={model}", f"data.train={files['prefs']}", f"data.validation={files['prefs']}",
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


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "rloo", "ppo"])
def test_two_processes(stage: str, tiny_model: Path, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    launch(stage, stage_args(stage, tiny_model, files, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    assert any((out / "model").glob("*.safetensors"))
    if stage == "ppo":  # our loop: one RNG state per process in each checkpoint, one metrics row per step
        ckpt = out / "checkpoints" / "step-2"
        assert sorted(p.name for p in ckpt.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    else:  # TRL's Trainer: 2 steps of 2 processes x 2 examples; TensorBoard from the main process
        state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("rng_state*.pth")) == [
            "rng_state_0.pth", "rng_state_1.pth"]
        writers = {p.name.split(".")[-2] for p in (out / "tb").rglob("events.out.tfevents.*")}  # ...<pid>.<n>
        assert len(writers) == 1  # TensorBoard is written by the main process only


def test_two_processes_with_half_the_batch_equal_one_process(tiny_model: Path, files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """Same data, 1 process x batch 4 vs 2 processes x batch 2: the same first-step loss and the same weights."""
    def args(out: Path, batch: int) -> list[str]:
        return [a for a in stage_args("sft", tiny_model, files, out) if not a.startswith("train.batch_size")] + [
            f"train.batch_size={batch}", "peft.dropout=0.0"]

    launch("sft", args(tmp_path / "one", 4), processes=1)
    launch("sft", args(tmp_path / "two", 2), processes=2)
    first = [next(e["loss"] for e in json.loads((tmp_path / d / "checkpoints/checkpoint-2/trainer_state.json")
                                                .read_text())["log_history"] if "loss" in e) for d in ("one", "two")]
    assert first[0] == pytest.approx(first[1], abs=1e-4)
    a, b = (load_file(str(tmp_path / d / "model" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
