"""PPO stage on tiny models: a toy reward it must raise, artifacts, resume after SIGKILL, critic/PEFT options,
two processes."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.errors import ConfigError
from align.stages import ppo

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "stages" / "tiny" / "ppo.yaml"
TARGET = "blue"
MAX_NEW_TOKENS = 12  # stages/tiny/ppo.yaml sampling.max_new_tokens


def count_target(prompt: list, response: str) -> float:
    """Toy reward: how often the word 'blue' appears, per generated-token slot (0..1)."""
    return response.count(TARGET) / MAX_NEW_TOKENS






def config(policy: Path, out: Path, *overrides: str) -> ppo.Config:
    return load_config(ppo.Config, TINY, [f"policy={policy}", f"output_dir={out}",
                                          "reward.function=test_ppo:count_target", *overrides])


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_toy_reward(toy_policy: Path, tmp_path: Path, one_thread: None) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = ppo.run(config(toy_policy, tmp_path / "run", "ppo.steps=8"))

    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = rows[0]["reward/mean"], sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > 2 * first and last > first + 0.1, [r["reward/mean"] for r in rows]
    assert all(math.isfinite(r["kl/ref"]) for r in rows) and rows[-1]["kl/ref"] > 0
    for key in ("reward/std", "entropy", "policy/clipfrac", "policy/approx_kl", "loss/value", "loss/policy",
                "value/explained_variance", "response/length", "time/generate", "time/score", "time/train"):
        assert all(math.isfinite(r[key]) for r in rows), key

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["outputs"]["model"] == "model"
    assert manifest["metrics"]["eval/reward_after"] >= manifest["metrics"]["eval/reward_before"]
    assert math.isfinite(manifest["metrics"]["eval/kl"])
    assert (run_dir / "samples.jsonl").is_file() and any((run_dir / "tb").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-6", "step-8"]

    # Only the adapter was trained: its B matrices moved off zero; the base model is untouched.
    adapter = run_dir / "model"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(toy_policy)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(toy_policy)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        original = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        assert not torch.allclose(tuned(input_ids=ids).logits, original, atol=1e-4)
        with tuned.disable_adapter():
            assert torch.equal(tuned(input_ids=ids).logits, original)
    assert load_file_critic(run_dir)["weight"].abs().sum() > 0


def load_file_critic(run_dir: Path) -> dict:
    return load_file(str(run_dir / "critic.safetensors"))


def start_ppo_cli(args: list[str], until: Path) -> subprocess.Popen:
    """`align ppo` on the tiny recipe in a subprocess, returned once `until` exists (it must not exit first)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "ppo", str(TINY), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not until.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"no {until.name} after 180 s"
        time.sleep(0.05)
    return proc


def test_ppo_resumes_after_sigkill(toy_policy: Path, tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "run"
    args = [f"policy={toy_policy}", f"output_dir={out}", "reward.function=test_ppo:count_target", "ppo.steps=6",
            "log.save_every=2", "data.eval_size=0"]
    proc = start_ppo_cli(args, until=out / "checkpoints" / "step-2" / "state.json")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    killed_at = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines())
    assert killed_at < 6

    run_dir = ppo.run(load_config(ppo.Config, TINY, [*args, "resume=true"]))
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint were redone, not doubled
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "checkpoints" / "step-6" / "state.json").read_text())["step"] == 6
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # ... and the result equals a run that was never interrupted (one thread, same seed)
    whole = ppo.run(load_config(ppo.Config, TINY, [*args, f"output_dir={tmp_path / 'whole'}"]))
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics_rows(d)] for d in (whole, run_dir)]
    assert untimed[0] == untimed[1]
    a, b = (load_file(str(d / "model" / "adapter_model.safetensors")) for d in (whole, run_dir))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # nothing in a checkpoint is pickled: a crafted checkpoint cannot run code on resume
    ckpt = run_dir / "checkpoints" / "step-6"
    assert not list(ckpt.glob("*.pt")) and (ckpt / "optimizer.safetensors").is_file()


def test_ppo_reward_model_reward_and_critic(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    """reward.model = a (tiny) reward-model folder; critic.kind=reward_model; score normalisation and clipping."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm)
    run_dir = ppo.run(load_config(ppo.Config, TINY, [
        f"policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "reward.function=", f"reward.model={rm}",
        "critic.kind=reward_model", "shaping.normalize=true", "shaping.clip=2.0", "shaping.missing_eos_penalty=0.5",
        "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.grad_accum=2", "data.eval_size=2"]))
    rows = metrics_rows(run_dir)
    assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values())
    assert all(abs(r["reward/shaped_mean"]) <= 2.0 for r in rows)
    critic = load_file(str(run_dir / "critic.safetensors"))
    assert any("lora_" in k for k in critic) and any("score" in k for k in critic)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_ppo_full_and_qlora(method: str, tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    run_dir = ppo.run(config(tiny_model, tmp_path / "run", f"peft.method={method}", "ppo.steps=1",
                             "reward.function=conftest:count_e",
                             "ppo.batch_size=4", "ppo.mini_batch_size=4", "data.eval_size=2"))
    assert all(math.isfinite(v) for v in metrics_rows(run_dir)[0].values())
    model = run_dir / "model"
    assert (model / ("config.json" if method == "full" else "adapter_config.json")).is_file()


def test_ppo_on_an_sft_adapter_saves_a_stacked_adapter(tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    """policy = an SFT adapter: it is merged, a fresh LoRA trained on top, and the PPO adapter names the SFT
    adapter as its base, so load_model merges both in order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.load import load_model

    sft = tmp_path / "sft_adapter"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(sft)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sft)
    cfg_path = sft / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"base_model_name_or_path": str(tiny_model)}))

    run_dir = ppo.run(config(sft, tmp_path / "run", "reward.function=conftest:count_e", "ppo.steps=1",
                             "ppo.batch_size=4", "ppo.mini_batch_size=4", "data.eval_size=0"))
    adapter = run_dir / "model"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        stacked = load_model(adapter, dtype="float32")(input_ids=ids).logits
        sft_only = load_model(sft, dtype="float32")(input_ids=ids).logits
        base = load_model(tiny_model, dtype="float32")(input_ids=ids).logits
    assert not torch.allclose(sft_only, base, atol=1e-5)  # the SFT adapter is part of the stack
    assert torch.isfinite(stacked).all() and not torch.equal(stacked, sft_only)  # and the PPO adapter on top


def test_ppo_config_errors(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_p"):
        ppo.run(config(tiny_model, tmp_path / "a", "sampling.top_p=0.9"))
    with pytest.raises(ConfigError, match="multiple"):
        ppo.run(config(tiny_model, tmp_path / "b", "ppo.batch_size=6", "ppo.mini_batch_size=4"))
    with pytest.raises(ConfigError, match="not supported by ppo"):
        ppo.run(config(tiny_model, tmp_path / "c", "peft.method=prompt_tuning"))
    with pytest.raises(ConfigError, match="critic.kind"):
        config(tiny_model, tmp_path / "d", "critic.kind=other")


SYSTEM = "Answer like a ship's cook."


def system_first(prompt: list, response: str) -> float:
    """1 when the prompt PPO sampled from (and scores) starts with SYSTEM as its system message, else 0."""
    return float(prompt[0] == {"role": "system", "content": SYSTEM})


def test_system_prompt_reaches_the_rollout_and_eval_prompts(tiny_model: Path, tmp_path: Path,
                                                             one_thread: None) -> None:
    """system_prompt= puts a system message first in every PPO prompt (training rollouts and the held-out check):
    the reward sees the conversation the sampler rendered, so a missing system message scores 0."""
    from align.stages.ppo_rollout import read_step_prompts

    run_dir = ppo.run(config(tiny_model, tmp_path / "run", "reward.function=test_ppo:system_first", "ppo.steps=1",
                             "ppo.batch_size=2", "ppo.mini_batch_size=2", "sampling.max_new_tokens=2",
                             "data.eval_size=1", f"system_prompt={SYSTEM}"))
    assert metrics_rows(run_dir)[0]["reward/mean"] == 1.0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["eval/reward_after"] == 1.0 and manifest["ppo"]["system_prompt"] == SYSTEM
    plain = read_step_prompts(str(REPO / "data/prompts/train.jsonl"), "")
    assert all(r.prompt[0]["role"] != "system" for r in plain[:4])  # the data itself has none


def test_step_prompts_split_processes_and_epochs() -> None:
    from align.data.records import PromptRecord

    prompts = [PromptRecord(prompt=[{"role": "user", "content": str(i)}]) for i in range(10)]
    from align.stages.ppo_rollout import step_prompts

    pick = lambda step, rank: [p.prompt[0]["content"] for p in step_prompts(prompts, step, rank, 2, 2, seed=3)]
    first_pass = pick(0, 0) + pick(0, 1) + pick(1, 0) + pick(1, 1) + pick(2, 0)
    assert sorted(first_pass, key=int) == [str(i) for i in range(10)]  # every prompt once per pass
    assert pick(1, 1) == pick(1, 1)  # a pure function of (step, rank): resumable
    assert pick(2, 1) + pick(3, 0) != first_pass[:4]  # a new shuffle in the next pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ppo_sigterm_checkpoints_the_step_and_resume_finishes_it(toy_policy: Path, tmp_path: Path,
                                                                 one_thread: None) -> None:
    """A scheduler's SIGTERM mid-run: PPO finishes the step it is in, checkpoints it (though save_every is not
    due), marks the run `interrupted`, exits 130; resume=true then equals an uninterrupted run."""
    out = tmp_path / "run"
    args = [f"policy={toy_policy}", f"output_dir={out}", "reward.function=test_ppo:count_target", "ppo.steps=4",
            "log.save_every=4", "data.eval_size=0"]
    proc = start_ppo_cli(args, until=out / "metrics.jsonl")  # the first step is logged
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stderr.read().decode()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    stopped_at = int(max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()))
    assert manifest["status"] == "interrupted" and stopped_at < 4
    assert (out / "checkpoints" / f"step-{stopped_at}" / "state.json").is_file()  # saved at the signal's step

    resumed = ppo.run(load_config(ppo.Config, TINY, [*args, "resume=true"]))
    whole = ppo.run(load_config(ppo.Config, TINY, [*args, f"output_dir={tmp_path / 'whole'}"]))
    a, b = (load_file(str(d / "model" / "adapter_model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_diverging_ppo_run_stops_at_that_step_unsaved(toy_policy: Path, tmp_path: Path) -> None:
    """A learning rate far too high: once a loss is no longer finite the run stops at that step with one clear
    error naming it and the fix, and no checkpoint from that step on exists (the earlier ones are finite)."""
    from align.errors import TrainingError

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"ppo diverged at step (\d+) \(loss/") as err:
        ppo.run(config(toy_policy, out, "ppo.steps=4", "ppo.lr=1e30", "ppo.epochs=1",
                           "ppo.mini_batch_size=16", "log.save_every=1"))
    step = int(str(err.value).split("at step ")[1].split(" ")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert 1 < step <= 4 and saved == list(range(1, step)), (step, saved)
    assert all(torch.isfinite(t).all() for s in saved
               for t in load_file(str(out / "checkpoints" / f"step-{s}" / "trainable.safetensors")).values())
