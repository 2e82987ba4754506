"""Resume is exact or refused: SIGKILL a stage after its first checkpoint, resume, and compare with a run that was
never interrupted (same final step, no duplicated log rows, trainable weights equal within 1e-6; one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import count_e, write_jsonl  # noqa: F401 - count_e is the GRPO reward, imported by name

from align.cli import main
from align.errors import AlignError

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false"}


def cli_args(stage: str, tmp: Path, model: Path) -> list[str]:
    """A tiny recipe of `stage` that saves a checkpoint every 2 of its 4 steps."""
    rows = [{"prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
             "chosen": [{"role": "assistant", "content": "blue blue blue."}],
             "rejected": [{"role": "assistant", "content": "red red red."}]} for i in range(24)]
    prefs = write_jsonl(tmp / "prefs.jsonl", rows[:16]), write_jsonl(tmp / "prefs_valid.jsonl", rows[16:])
    sft = write_jsonl(tmp / "sft.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in rows])
    steps = ["train.max_steps=4", "train.save_steps=2", "train.progress=false", "train.batch_size=4",
             "train.logging_steps=1"]
    return {
        "sft": [f"model={model}", f"data.train={sft}", f"data.validation={sft}", "train.eval_steps=0", *steps],
        "reward": [f"model={model}", f"data.train={prefs[0]}", f"data.validation={prefs[1]}", "train.eval_steps=0",
                   *steps],
        "dpo": [f"policy={model}", f"data.train={prefs[0]}", f"data.validation={prefs[1]}", *steps],
        "grpo": [f"policy={model}", "reward.function=conftest:count_e", *steps],
        "rloo": [f"policy={model}", "reward.function=conftest:count_e", *steps],
    }[stage]


def run_cli(stage: str, args: list[str], out: Path) -> None:
    assert main([stage, str(REPO / "stages" / "tiny" / f"{stage}.yaml"), *args, f"output_dir={out}"]) == 0


def trainable_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "model").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def kill_after_first_checkpoint(stage: str, args: list[str], out: Path, marker: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", stage, str(REPO / "stages" / "tiny" / f"{stage}.yaml"),
                             *args, f"output_dir={out}"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / marker).is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"no {marker} after 240 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # a kill leaves it running


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "rloo"])
def test_trainer_stage_resumes_exactly_after_sigkill(stage: str, tiny_model: Path, tmp_path: Path,
                                                    one_thread: None) -> None:
    args = cli_args(stage, tmp_path, tiny_model)
    run_cli(stage, args, tmp_path / "whole")
    kill_after_first_checkpoint(stage, args, tmp_path / "cut", "checkpoints/checkpoint-2/trainer_state.json")
    # a checkpoint torn by the kill (no trainer_state.json yet) is skipped, never resumed from
    torn = tmp_path / "cut" / "checkpoints" / "checkpoint-3"
    torn.mkdir(exist_ok=True)
    run_cli(stage, [*args, "resume=true"], tmp_path / "cut")

    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["status"] == "completed"
    state = json.loads((tmp_path / "cut" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 4 and steps == sorted(set(steps)) and steps[-1] == 4  # no duplicated rows
    a, b = trainable_weights(tmp_path / "whole"), trainable_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    # the logged per-step losses of the resumed run are those of the uninterrupted one
    whole_state = json.loads((tmp_path / "whole" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [{e["step"]: e["loss"] for e in st["log_history"] if "loss" in e} for st in (whole_state, state)]
    assert losses[0].keys() == losses[1].keys()
    assert all(losses[1][k] == pytest.approx(v, abs=1e-5) for k, v in losses[0].items())


def test_resume_refuses_changed_settings_and_other_stages(tiny_model: Path, tmp_path: Path, one_thread: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args("sft", tmp_path, tiny_model)
    out = tmp_path / "run"
    run_cli("sft", [*args, "train.max_steps=2"], out)
    config_before = (out / "config.yaml").read_text()
    assert main(["sft", str(REPO / "stages/tiny/sft.yaml"), *args, f"output_dir={out}", "resume=true",
                 "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "settings changed" in err and "train.lr" in err and "train.max_steps (2 -> 4)" in err
    assert (out / "config.yaml").read_text() == config_before  # nothing was rewritten
    # another stage's folder is never resumed into (it once turned an SFT run into a generate run)
    assert main(["generate", str(REPO / "stages/tiny/generate.yaml"), f"model={tiny_model}", f"output_dir={out}",
                 "resume=true"]) == 2
    assert "holds a sft run, not a generate run" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["stage"] == "sft"


def test_generate_resume_refuses_a_different_k(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    from align.config import load_config
    from align.stages import generate

    cfg = [f"model={tiny_model}", f"output_dir={tmp_path / 'g'}", "max_prompts=2"]
    generate.run(load_config(generate.Config, REPO / "stages/tiny/generate.yaml", [*cfg, "k=1"]))
    with pytest.raises(AlignError, match=r"k \(1 -> 3\)"):
        generate.run(load_config(generate.Config, REPO / "stages/tiny/generate.yaml", [*cfg, "k=3", "resume=true"]))


def test_generate_resumes_after_sigkill_to_the_same_samples(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    args = [f"model={tiny_model}", "max_prompts=8", "chunk=1", "k=2", "sampling.max_new_tokens=8"]
    run_cli("generate", args, tmp_path / "whole")
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "generate", str(REPO / "stages/tiny/generate.yaml"),
                             *args, f"output_dir={out}"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not ((out / "samples.jsonl").is_file() and (out / "samples.jsonl").read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "samples.jsonl").read_bytes().count(b"\n") < 8
    run_cli("generate", [*args, "resume=true"], out)
    assert (out / "samples.jsonl").read_text() == (tmp_path / "whole" / "samples.jsonl").read_text()
