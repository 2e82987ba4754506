"""LoRA layers as one autograd node (align/models/fused_lora.py): the values and gradients of PEFT's LoRA for the
same dropout masks, PEFT's own forward wherever the one-node sum is not the same computation, and adapters that
save and reload as PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from test_lean import nonzero_lora_b

from align.models import fused_lora
from align.models.fused_lora import fuse_lora, lora_linear
from align.models.peft import PeftSettings, attach_peft


def test_lora_linear_values_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w, bias = torch.randn(7, 6, dtype=torch.float64, generator=gen), torch.randn(7, dtype=torch.float64, generator=gen)
    a = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(2, 5, 6, generator=gen) >= 0.4
    by_hand = x @ w.T + bias + 0.5 * ((x * mask / 0.6) @ a.T) @ b.T
    assert torch.allclose(fused_lora._LoraLinear.apply(x, w, bias, a, b, 0.5, mask, 0.6), by_hand)
    assert torch.allclose(lora_linear(x, w, bias, a, b, 0.5), x @ w.T + bias + 0.5 * (x @ a.T) @ b.T)
    for m in (mask, None):  # with dropout and without; W and b are frozen (no gradient asked for)
        assert torch.autograd.gradcheck(lambda x_, a_, b_, m=m: fused_lora._LoraLinear.apply(
            x_, w, bias, a_, b_, 0.5, m, 0.6 if m is not None else 1.0), (x, a, b))
    # an input that needs no gradient (the first layer's, over frozen embeddings) gets none computed
    y = lora_linear(x.detach(), w, None, a, b, 0.5)
    y.sum().backward()
    assert a.grad is not None and b.grad is not None


def attached(tiny_model: Path, method: str = "lora", dropout: float = 0.3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return nonzero_lora_b(attach_peft(base, PeftSettings(method=method, r=4, alpha=8, dropout=dropout))[0])


def unfused(model):
    for module in model.modules():
        if isinstance(module, PeftLinear):
            module.__class__ = PeftLinear
    return model


def loss_and_grads(model, ids: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the one-node path ran."""
    seen: list[int] = []
    real = fused_lora.lora_linear

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_lora, "lora_linear", counting)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_model_equals_peft_for_the_same_masks(tiny_model: Path, dropout: float, calls: list[int]) -> None:
    fused, plain = attached(tiny_model, dropout=dropout), unfused(attached(tiny_model, dropout=dropout))
    assert sum(type(m).__name__ == "FusedLoraLinear" for m in fused.modules()) == 14  # 2 layers x 7 linears
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    fused_loss, fused_grads = loss_and_grads(fused, ids)
    assert len(calls) == 14
    plain_loss, plain_grads = loss_and_grads(plain, ids)  # lean's dropout: the same draws, in the same order
    assert len(calls) == 14
    assert torch.allclose(fused_loss, plain_loss, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == 28
    for name in plain_grads:
        assert torch.allclose(fused_grads[name], plain_grads[name], atol=1e-6), name
        assert fused_grads[name].abs().sum() > 0, name
    if dropout:  # another seed draws other masks: the dropout is really applied
        assert not torch.allclose(loss_and_grads(fused, ids, seed=4)[0], fused_loss, atol=1e-6)
    fused.eval(), plain.eval()  # no dropout in eval mode
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_peft_forward_where_the_sum_differs(tiny_model: Path, calls: list[int]) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(5))
    model = attached(tiny_model, dropout=0.0).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        with model.disable_adapter():  # the reference pass of DPO and PPO
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not calls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert not calls
        live = model(input_ids=ids).logits
        assert len(calls) == 14
        model.merge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, live, atol=1e-5) and len(calls) == 14
    dora = attached(tiny_model, "dora", dropout=0.0)  # a LoRA variant: PEFT computes it
    plain = unfused(attached(tiny_model, "dora", dropout=0.0))
    calls.clear()
    with torch.no_grad():
        assert torch.equal(dora.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    assert not calls


def test_a_live_adapter_is_fused_and_saves_and_reloads_as_peft(tiny_model: Path, tmp_path: Path,
                                                               calls: list[int]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.models.load import load_model

    trained = attached(tiny_model, dropout=0.1)
    keys = list(unfused(attached(tiny_model, dropout=0.1)).state_dict())
    assert list(trained.state_dict()) == keys
    trained.save_pretrained(tmp_path / "adapter")
    live = load_model(tmp_path / "adapter", dtype="float32", merge=False).eval()
    assert sum(type(m).__name__ == "FusedLoraLinear" for m in live.modules()) == 14
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not any(type(m).__name__ == "FusedLoraLinear" for m in plain.modules())
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(live(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    assert len(calls) == 14


def test_fuse_lora_leaves_other_layers_alone() -> None:
    assert fuse_lora(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))) == 0
