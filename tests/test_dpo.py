"""DPO stage on a tiny model and a toy preference ('blue' answers preferred over 'red' ones)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from align.config import load_config
from align.errors import ConfigError
from align.stages import dpo

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "stages" / "tiny" / "dpo.yaml"


def says_blue(prompt: list, response: str) -> float:
    """Held-out check reward for the toy: how often 'blue' appears."""
    return float(response.count("blue"))


@pytest.fixture
def toy_prefs(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"prompt": [{"role": "user", "content": f"What colour is item {i}?"}],
             "chosen": [{"role": "assistant", "content": "blue blue blue."}],
             "rejected": [{"role": "assistant", "content": "red red red."}],
             "meta": {"source": "toy"}} for i in range(20)]
    return write_jsonl(tmp_path / "train.jsonl", rows[:16]), write_jsonl(tmp_path / "valid.jsonl", rows[16:])




def config(policy: Path, out: Path, prefs: tuple[Path, Path], *overrides: str) -> dpo.Config:
    return load_config(dpo.Config, TINY, [f"policy={policy}", f"output_dir={out}", f"data.train={prefs[0]}",
                                          f"data.validation={prefs[1]}", *overrides])


def test_dpo_learns_toy_preference(tiny_model: Path, toy_prefs: tuple[Path, Path], tmp_path: Path,
                                   one_thread: None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = dpo.run(config(tiny_model, tmp_path / "run", toy_prefs, "train.max_steps=8", "train.batch_size=4",
                             "eval.size=2", "eval.reward.function=test_dpo:says_blue",
                             "eval.sampling.max_new_tokens=8"))
    m = json.loads((run_dir / "manifest.json").read_text())
    metrics = m["metrics"]
    assert m["status"] == "completed"
    # Before training the policy IS the reference: every implicit reward is 0, the loss ln 2, accuracy 0 (ties).
    assert metrics["first/loss"] == pytest.approx(math.log(2), abs=1e-4) and metrics["first/rewards/accuracies"] == 0
    assert metrics["eval_loss"] < math.log(2) - 0.05
    assert metrics["eval_rewards/accuracies"] == 1.0 and metrics["eval_rewards/margins"] > 0
    assert metrics["loss"] < metrics["first/loss"] and metrics["rewards/margins"] > metrics["first/rewards/margins"]
    assert math.isfinite(metrics["eval/kl"]) and "eval/reward_after" in metrics
    assert any((run_dir / "tb").iterdir())

    adapter = run_dir / "model"
    assert not (adapter / "ref").exists()  # only the trained adapter is saved
    config_json = json.loads((adapter / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(tiny_model.resolve())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        original = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        assert not torch.allclose(tuned(input_ids=ids).logits, original, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_dpo_loss_variants(loss_type: str, tiny_model: Path, toy_prefs: tuple[Path, Path], tmp_path: Path,
                           one_thread: None) -> None:
    run_dir = dpo.run(config(tiny_model, tmp_path / "run", toy_prefs, f"dpo.loss_type={loss_type}",
                             "train.max_steps=2", "train.batch_size=4", "data.validation="))
    metrics = json.loads((run_dir / "manifest.json").read_text())["metrics"]
    assert math.isfinite(metrics["train_loss"]) and "rewards/margins" in metrics


def test_dpo_config_errors(tiny_model: Path, toy_prefs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loss_type"):
        dpo.run(config(tiny_model, tmp_path / "a", toy_prefs, "dpo.loss_type=bogus"))
    with pytest.raises(ConfigError, match="not supported by dpo"):
        dpo.run(config(tiny_model, tmp_path / "b", toy_prefs, "peft.method=prefix_tuning"))


def test_dpo_sft_weight_adds_chosen_nll(tiny_model: Path, toy_prefs: tuple[Path, Path], tmp_path: Path,
                                        one_thread: None) -> None:
    """RPO: loss = DPO + w·mean NLL of the chosen tokens. At step 1 the policy is the reference (DPO term ln 2),
    so the logged loss is ln 2 + w·NLL, with NLL computed here by hand from the tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert dpo.loss_kwargs(dpo.DPOSettings()) == {"loss_type": ["sigmoid"]}
    assert dpo.loss_kwargs(dpo.DPOSettings(loss_type="ipo", sft_weight=0.5)) == {
        "loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]}
    run_dir = dpo.run(config(tiny_model, tmp_path / "run", toy_prefs, "dpo.sft_weight=0.5", "train.max_steps=4",
                             "train.batch_size=4", "data.validation="))
    metrics = json.loads((run_dir / "manifest.json").read_text())["metrics"]

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    row = json.loads(toy_prefs[0].read_text().splitlines()[0])
    prompt_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
    full_ids = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True)
    prompt_ids = getattr(prompt_ids, "input_ids", prompt_ids)
    full_ids = getattr(full_ids, "input_ids", full_ids)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([full_ids])).logits[0, :-1], -1)
    targets = torch.tensor(full_ids[1:])
    token_logps = logps.gather(-1, targets[:, None])[:, 0][len(prompt_ids) - 1:]
    nll = -token_logps.mean().item()
    assert metrics["first/loss"] == pytest.approx(math.log(2) + 0.5 * nll, abs=0.01)  # TRL may differ by a template token
    assert metrics["loss"] < metrics["first/loss"]
    with pytest.raises(ConfigError, match="sft_weight"):
        dpo.run(config(tiny_model, tmp_path / "bad", toy_prefs, "dpo.sft_weight=-1"))
