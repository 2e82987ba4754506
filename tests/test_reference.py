"""The reference of DPO/PPO is the SFT policy itself: merging the SFT adapter to build the starting policy must
not change what it computes (no LoRA delta rounded away in bf16, no 4-bit base swapped for its unquantized
original)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.models.load import dequantize_4bit, quantization_config
from align.models.peft import PeftSettings
from align.models.policy import load_policy
from tests.test_sft import run_sft

TOKENS = torch.tensor([[1, 17, 230, 5, 99, 42, 7, 300, 12, 2]])


def logprobs(model: torch.nn.Module) -> torch.Tensor:
    """log π(token_t | tokens_<t) along TOKENS: [seq-1]."""
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, TOKENS[0, 1:, None])[:, 0]


def sft_as_trained(base: Path, adapter: Path, method: str) -> torch.nn.Module:
    """The SFT run's own model, built with plain transformers + peft: its base as SFT loaded it (4-bit for qlora,
    dequantized to float32 so it can be compared at 1e-5) with the adapter on top, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                     quantization_config=quantization_config(torch.float32))
        model = dequantize_4bit(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_reference_of_dpo_and_ppo_is_the_sft_policy(method, tiny_model, toy_sft, tmp_path):
    run_sft(tiny_model, toy_sft, tmp_path / "sft", f"peft.method={method}", "train.max_steps=2", "train.lr=5e-2")
    adapter = tmp_path / "sft" / "model"
    sft_model = sft_as_trained(tiny_model, adapter, method)
    own = logprobs(sft_model)
    with sft_model.disable_adapter():
        unadapted = logprobs(sft_model)
    assert (own - unadapted).abs().max() > 1e-3  # the SFT adapter matters, so equality below means something

    served = load_policy(tmp_path / "sft", stage="eval", dtype="float32")  # eval/generate's view of the SFT run
    assert (logprobs(served.model) - own).abs().max() < 1e-5
    for stage in ("dpo", "ppo"):
        policy = load_policy(tmp_path / "sft", stage=stage, peft=PeftSettings(method="lora", r=4, alpha=8),
                             dtype="float32")
        with policy.model.disable_adapter():  # the adapter-disabled reference DPO and PPO use
            reference = logprobs(policy.model)
        assert (reference - own).abs().max() < 1e-5, stage
        assert (logprobs(policy.model) - own).abs().max() < 1e-5, f"{stage}: a fresh adapter starts at the SFT policy"


def test_a_bf16_policy_is_merged_in_float32_then_cast(tiny_model, toy_sft, tmp_path):
    """Folding the LoRA delta into bf16 weights rounds it twice; merging in fp32 and casting once is the nearest
    bf16 model to the SFT policy, weight by weight."""
    from align.models.load import load_model

    run_sft(tiny_model, toy_sft, tmp_path / "sft", "train.max_steps=2", "train.lr=5e-2")
    adapter = tmp_path / "sft" / "model"
    true = load_model(adapter, dtype="float32").state_dict()
    exact = load_model(adapter, dtype="bfloat16").state_dict()
    naive = load_model(adapter, dtype="float32", merge=False).to(torch.bfloat16).merge_and_unload().state_dict()
    exact_err = sum((exact[k].float() - true[k]).abs().sum() for k in true)
    naive_err = sum((naive[k].float() - true[k]).abs().sum() for k in true)
    assert all(exact[k].dtype == torch.bfloat16 for k in exact)
    assert exact_err < naive_err
