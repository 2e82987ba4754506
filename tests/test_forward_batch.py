"""train.forward_batch: a micro-batch run as several forward/backward passes with their gradients summed is the
same update as one pass (SFT: a mean over the batch's tokens; reward and DPO: a mean over pairs), on real stage
runs; auto picks passes of at most FORWARD_TOKENS tokens of the data's longest example on a CPU; losses that couple
a batch's pairs refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import config as dpo_config
from test_dpo import toy_prefs  # noqa: F401  (fixture)
from test_reward import tiny_cfg as reward_config
from test_reward import toy_files  # noqa: F401  (fixture)

from align.config import load_config
from align.errors import ConfigError
from align.stages import dpo, grpo, reward, sft
from align.training import FORWARD_TOKENS, TrainSettings, forward_batch, longest_example, trainer_kwargs

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize(("batch", "example_tokens", "expected"), [
    (8, 768, 1),      # reward/DPO pairs at max_length 384: one pair a pass
    (8, 384, 2),      # SFT at max_length 384
    (8, 100, 8),      # short examples: the whole micro-batch
    (6, 300, 3),      # the largest divisor that fits (4 does not divide 6)
    (7, 200, 1),      # 7 is prime and 7 x 200 > the budget
    (4, 5000, 1),     # one example over the budget still runs, alone
    (8, None, 8),     # a stage whose loss would change: never split unless asked
])
def test_auto_forward_batch_on_a_cpu(batch, example_tokens, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert forward_batch(TrainSettings(batch_size=batch), example_tokens) == expected
    assert expected * (example_tokens or 0) <= FORWARD_TOKENS or expected == 1 or example_tokens is None


def test_the_longest_example_sizes_the_passes():
    assert longest_example([30, 250, 90]) == 250
    assert longest_example(iter([30, 250, 90]), 2) == 500  # a pair: two sequences padded to the longer, or packed
    assert longest_example([]) == 1


def test_a_gpu_and_an_explicit_setting(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert forward_batch(TrainSettings(batch_size=8), 768) == 8  # a GPU wants large passes
    assert forward_batch(TrainSettings(batch_size=8, forward_batch=2), 768) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kwargs = trainer_kwargs(TrainSettings(batch_size=8, grad_accum=3, forward_batch=2), tmp_path, seed=0, has_eval=True,
                            example_tokens=768)
    # the Trainer sees passes as micro-batches: 4 passes of 2 per micro-batch, 3 micro-batches per step
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (2, 12)
    assert kwargs["per_device_eval_batch_size"] == 8  # evaluation keeps no activations: whole batches


def test_forward_batch_must_divide_the_batch_and_only_where_the_loss_allows():
    with pytest.raises(ConfigError, match="must divide train.batch_size=8"):
        TrainSettings(batch_size=8, forward_batch=3)
    with pytest.raises(ConfigError, match="not used by grpo"):
        load_config(grpo.Config, REPO / "stages/tiny/grpo.yaml", ["train.forward_batch=2"])
    for coupled in (["dpo.sft_weight=1.0"], ["dpo.loss_type=aot"]):
        with pytest.raises(ConfigError, match="would change the loss"):
            load_config(dpo.Config, REPO / "stages/tiny/dpo.yaml", ["train.forward_batch=2", *coupled])
        assert not dpo.per_pair_loss(load_config(dpo.Config, REPO / "stages/tiny/dpo.yaml", coupled).dpo)
    assert dpo.per_pair_loss(load_config(dpo.Config, REPO / "stages/tiny/dpo.yaml", []).dpo)


def last_checkpoint(run: Path) -> Path:
    return max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def same_update(one: Path, split: Path, passes: int, batch: int) -> None:
    """Both runs logged the same loss and pre-clipping gradient norm at every step and end with the same adapter;
    the split run really ran batch / passes examples a pass."""
    a, b = (json.loads((last_checkpoint(r) / "trainer_state.json").read_text()) for r in (one, split))
    assert (a["train_batch_size"], b["train_batch_size"]) == (batch, batch // passes)
    steps_a = [(h["step"], h["loss"], h["grad_norm"]) for h in a["log_history"] if "grad_norm" in h]
    steps_b = [(h["step"], h["loss"], h["grad_norm"]) for h in b["log_history"] if "grad_norm" in h]
    assert len(steps_a) == 2 and [s[0] for s in steps_a] == [s[0] for s in steps_b]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(steps_a, steps_b):
        # the gradient norm is logged before clipping: a mis-scaled sum (Adam would hide it in the weights) shows here
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)
    wa, wb = (load_file(str(last_checkpoint(r) / "adapter_model.safetensors")) for r in (one, split))
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam's first steps move each weight by ~lr (1e-2 here); float rounding of ~eps-sized gradients
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)  # moves a few by ~1e-6


# The "one" runs leave train.forward_batch on auto with a max_length whose worst case (a pass of one or two
# max_length examples) would split the batch: the short toy examples put the whole batch in one pass.

def test_sft_in_passes_is_the_same_update(tiny_model, tmp_path, monkeypatch):
    """The demo SFT examples differ in length: a per-pass token mean would weight them differently."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def run(name: str, fb: int) -> Path:
        return sft.run(load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [
            f"model={tiny_model}", f"output_dir={tmp_path / name}", "peft.dropout=0.0", "train.max_steps=2",
            "train.batch_size=4", f"train.forward_batch={fb}", "train.logging_steps=1", "train.save_steps=2",
            "train.eval_steps=0", "data.max_length=512"]))

    same_update(run("one", 0), run("split", 1), passes=4, batch=4)


def test_reward_in_passes_is_the_same_update(tiny_model, toy_files, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def run(name: str, fb: int) -> Path:
        return reward.run(reward_config(tiny_model, *toy_files, tmp_path / name, "train.max_steps=2",
                                        "train.batch_size=4", f"train.forward_batch={fb}", "train.logging_steps=1",
                                        "train.save_steps=2", "center_rewards_coefficient=0.01", "baselines=false",
                                        "data.max_length=256"))

    same_update(run("one", 0), run("split", 2), passes=2, batch=4)


def test_dpo_in_passes_is_the_same_update(tiny_model, toy_prefs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def run(name: str, fb: int) -> Path:
        return dpo.run(dpo_config(tiny_model, tmp_path / name, toy_prefs, "train.max_steps=2", "train.batch_size=4",
                                  f"train.forward_batch={fb}", "train.logging_steps=1", "train.save_steps=2",
                                  "data.max_length=384"))

    same_update(run("one", 0), run("split", 1), passes=4, batch=4)
