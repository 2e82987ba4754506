"""SFT on a tiny random model for every PEFT method: it trains, saves, and reloads in plain transformers/peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.models.load import quantization_config
from align.models.peft import ADAPTER_METHODS
from align.stages import sft

METHODS = ["lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "freeze",
           "bitfit", "full"]


def run_sft(model: Path, data: tuple[Path, Path], out: Path, *overrides: str) -> dict:
    train, valid = data
    cfg = load_config(sft.Config, Path("stages/tiny/sft.yaml"),
                      [f"model={model}", f"output_dir={out}", f"data.train={train}", f"data.validation={valid}",
                       "train.progress=false", *overrides])
    run_dir = sft.run(cfg)
    return json.loads((run_dir / "manifest.json").read_text())


def reload_plain(run_dir: Path, base: Path, method: str):
    """Load the artifact the way a user without align would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config(torch.float32)} if method == "qlora" else {}
    if method in ADAPTER_METHODS:
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), run_dir / "model")
    return AutoModelForCausalLM.from_pretrained(run_dir / "model")


@pytest.mark.parametrize("method", METHODS)
def test_every_peft_method_trains_saves_and_reloads(method, tiny_model, tiny_model_with_bias, toy_sft, tmp_path):
    base = tiny_model_with_bias if method == "bitfit" else tiny_model
    man = run_sft(base, toy_sft, tmp_path / "run", f"peft.method={method}")
    m = man["metrics"]
    assert man["status"] == "completed"
    assert all(torch.isfinite(torch.tensor([m["eval_loss_before"], m["eval_loss_after"], m["train_loss"]])))
    assert 0 < m["trainable_params"] <= m["total_params"]
    # Every trainable tensor moved (AdaLoRA may prune a module's ranks back to zero); no frozen tensor did.
    if method == "adalora":
        assert m["trainable_tensors_changed"] >= 0.8 * m["trainable_tensors"] > 0
    else:
        assert m["trainable_tensors_changed"] == m["trainable_tensors"] > 0
    assert m["frozen_tensors_changed"] == 0
    if method in ("lora", "dora", "full", "freeze", "qlora"):
        assert m["eval_loss_after"] < m["eval_loss_before"]
    model = reload_plain(tmp_path / "run", base, method).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([man["probe"]["input_ids"]])).logits[0, -1].float()
    atol = 1e-3 if method == "qlora" else 1e-4  # 4-bit kernels differ slightly between train-time and reload
    assert torch.allclose(logits[:16], torch.tensor(man["probe"]["logits_head"]), atol=atol)


def test_bitfit_trains_biases_when_the_model_has_them(tiny_model_with_bias, toy_sft, tmp_path):
    man = run_sft(tiny_model_with_bias, toy_sft, tmp_path / "run", "peft.method=bitfit")
    assert "bias vectors" in man["peft"]["trained"]
    assert man["metrics"]["frozen_tensors_changed"] == 0


def test_bitfit_on_llama_without_biases_says_what_it_trains(tiny_model, toy_sft, tmp_path):
    man = run_sft(tiny_model, toy_sft, tmp_path / "run", "peft.method=bitfit")
    assert "normalization scales" in man["peft"]["trained"]


def test_manifest_contract(tiny_model, toy_sft, tmp_path):
    man = run_sft(tiny_model, toy_sft, tmp_path / "run")
    for key in ("stage", "status", "config", "inputs", "outputs", "metrics", "versions", "git_sha", "started_at",
                "finished_at"):
        assert key in man
    assert man["stage"] == "sft" and man["outputs"]["model"] == "model"
    assert str(toy_sft[0]) in man["inputs"] and len(man["inputs"][str(toy_sft[0])]) == 64
    assert man["config"]["peft"]["method"] == "lora"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_loss_masks_everything_but_assistant_turns(tiny_model):
    from align.models.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    ids, labels = sft.tokenize_conversation(tok, msgs, "assistant")
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert learned == "hello there<|im_end|>\nbye<|im_end|>\n"
    _, all_labels = sft.tokenize_conversation(tok, msgs, "all")
    assert all_labels == ids


def test_merge_folds_lora_into_a_full_model(tiny_model, toy_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.stages import merge

    man = run_sft(tiny_model, toy_sft, tmp_path / "run")
    out = merge.run(load_config(merge.Config, None, [f"adapter={tmp_path / 'run'}", f"output_dir={tmp_path / 'm'}"]))
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([man["probe"]["input_ids"]])).logits[0, -1]
    assert torch.allclose(logits[:16], torch.tensor(man["probe"]["logits_head"]), atol=1e-4)


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tiny_model, toy_sft, tmp_path, capsys):
    """A learning rate far too high: the loss stops being finite; the run stops at that step with one line naming
    it and the fix, is marked failed, and no checkpoint holds the non-finite weights."""
    from safetensors.torch import load_file

    from align.cli import main

    train, valid = toy_sft
    out = tmp_path / "run"
    code = main(["sft", "stages/tiny/sft.yaml", f"model={tiny_model}", f"output_dir={out}", f"data.train={train}",
                 f"data.validation={valid}", "train.progress=false", "peft.method=full", "train.lr=1e30",
                 "train.max_steps=6", "train.save_steps=1", "train.eval_steps=0", "train.warmup_ratio=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    line = err[-1]
    step = int(line.split("training diverged at step ")[1].split(" ")[0])
    assert 1 <= step < 6 and "train.lr (now 1e+30)" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert all(s < step for s in saved), (saved, step)
    for s in saved:
        weights = load_file(str(out / "checkpoints" / f"checkpoint-{s}" / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_diverging_run_stops_at_the_first_non_finite_step_between_two_logs(tiny_model, toy_sft, tmp_path, capsys,
                                                                             monkeypatch):
    """Logging every 10 steps, saving every step: the loss (so every gradient) turns NaN at optimizer step 3, between
    two logs. The run stops at step 3 (the gradients are checked at every optimizer step, not only logged ones) with
    the one line, is marked failed, and keeps no checkpoint from step 3 on, nor a final model."""
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from align.cli import main

    original, training_calls = SFTTrainer.compute_loss, []

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:  # train.grad_accum=1: the n-th training loss is optimizer step n
            training_calls.append(1)
            if len(training_calls) == 3:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_at_step_3)
    train, valid = toy_sft
    out = tmp_path / "run"
    code = main(["sft", "stages/tiny/sft.yaml", f"model={tiny_model}", f"output_dir={out}", f"data.train={train}",
                 f"data.validation={valid}", "train.progress=false", "train.max_steps=4", "train.save_steps=1",
                 "train.logging_steps=10", "train.eval_steps=0", "train.warmup_ratio=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "training diverged at step 3 (" in err[-1] and "train.lr (now 0.01)" in err[-1]
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert saved == [1, 2]  # save_total_limit=2 keeps the last two before the diverging step
    for s in saved:
        for f in (out / "checkpoints" / f"checkpoint-{s}").glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())
    assert not (out / "model").exists()


@pytest.mark.parametrize("foreach", [True, False], ids=["torch>=2.6", "older torch"])
def test_grads_finite_is_0_when_any_gradient_is_nan_or_inf(foreach, monkeypatch):
    from align.training import grads_finite, on_every_process

    if not foreach:
        monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    a, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    a.grad, b.grad = torch.zeros(3), torch.full((3,), 3e38, dtype=torch.bfloat16)  # large, still finite
    assert on_every_process(grads_finite([a, b, frozen], "cpu"))
    assert on_every_process(grads_finite([frozen], "cpu"))  # nothing to check: finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        b.grad = torch.tensor([1.0, bad, 2.0], dtype=torch.bfloat16)
        assert not on_every_process(grads_finite([a, b, frozen], "cpu"))


def test_the_callback_stops_on_a_non_finite_gradient_and_saves_nothing_after_it():
    """Without a Trainer: fp16 overflows are the loss scaler's (it skips the step); otherwise a non-finite gradient
    drops the gradients (the optimizer step leaves the weights), stops, and cancels the saves and evaluations the
    Trainer's own callback schedules afterwards at that step and at the epoch's end; the line names the step taken."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from align.errors import TrainingError
    from align.training import run_callback

    model = torch.nn.Linear(2, 1)
    model.weight.grad, model.bias.grad = torch.tensor([[1.0, float("inf")]]), torch.zeros(1)
    args = SimpleNamespace(fp16=True, device="cpu", learning_rate=1e-3, output_dir=".")
    cb, state, control = run_callback(), TrainerState(global_step=6), TrainerControl()
    cb.on_pre_optimizer_step(args, state, control, model=model)
    cb.on_log(args, state, control, logs={"loss": 1.0, "grad_norm": float("inf")})
    assert not control.should_training_stop and model.weight.grad is not None
    args.fp16 = False
    cb.on_pre_optimizer_step(args, state, control, model=model)
    assert control.should_training_stop and model.weight.grad is None and model.bias.grad is None
    for event in (cb.on_step_end, cb.on_epoch_end):
        control.should_save = control.should_evaluate = True  # as transformers' DefaultFlowCallback does
        event(args, state, control)
        assert not (control.should_save or control.should_evaluate)
    with pytest.raises(TrainingError, match=r"^training diverged at step 7 \(a gradient is nan or inf\)"):
        cb.on_train_end(args, state, control)


def _finite_on_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from align.training import grads_finite, on_every_process

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, float("nan") if rank == 1 else 1.0])  # a shard only rank 1 holds went NaN
    Path(out, f"rank-{rank}").write_text(str(on_every_process(grads_finite([p], "cpu"))))
    dist.destroy_process_group()


def test_every_process_takes_the_same_decision_when_one_shard_is_not_finite(tmp_path):
    torch.multiprocessing.spawn(_finite_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank-{r}").read_text() for r in range(2)] == ["False", "False"]
