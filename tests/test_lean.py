"""LoRA dropout without a kept float copy (align.models.lean.py): the same forward values and gradients as
PEFT's dropout for the same masks, the same distribution of masks, less saved activation memory, and an adapter that
saves and reloads as PEFT's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.models import lean as lean_module
from align.models.lean import DropoutLinear, dropped_linear, keep_mask, lean_lora_dropout


def test_dropped_linear_matches_dropout_then_linear_for_the_same_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, generator=gen, requires_grad=True)
    mask = torch.rand(3, 5, 8, generator=gen) >= 0.3
    up = torch.randn(3, 5, 4, generator=gen)
    (dropped_linear(x, w, 0.3, mask) * up).sum().backward()
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ref = torch.nn.functional.linear(x * mask / 0.7, w)
    (ref * up).sum().backward()
    assert torch.allclose(dropped_linear(x, w, 0.3, mask), ref, atol=1e-6)
    assert torch.allclose(got[0], x.grad, atol=1e-6) and torch.allclose(got[1], w.grad, atol=1e-6)
    assert got[0][~mask].abs().max() == 0  # dropped inputs get no gradient


def test_drawn_masks_keep_1_minus_p() -> None:
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropped_linear(x, torch.eye(500), 0.2)  # identity weight: y is the dropped input itself
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.8) < 0.005  # 200k Bernoulli draws: sd 0.0009
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.6])
def test_keep_mask_is_independent_bernoulli(p: float) -> None:
    """Every element kept with probability 1 - p, independently of the others (drops drawn as Geometric gaps for a
    small p, element by element for a large one): rate, spread over rows, neighbours, and a row's end and start."""
    torch.manual_seed(0)
    mask = keep_mask(torch.empty(2000, 500), p)
    assert mask.shape == (2000, 500) and mask.dtype == torch.bool
    drop = (~mask).double()
    sd = (p * (1 - p) / drop.numel()) ** 0.5
    assert abs(drop.mean().item() - p) < 5 * sd
    per_row = drop.mean(1)  # 2000 rows of 500: their spread is the binomial one
    assert abs(per_row.var().item() / (p * (1 - p) / 500) - 1) < 0.15
    for a, b in ((drop[:, :-1], drop[:, 1:]), (drop[:-1, -1], drop[1:, 0])):  # neighbours, a row's end and the next's start
        both = (a * b).mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / a.numel()) ** 0.5


def test_keep_mask_patterns_have_bernoulli_probabilities() -> None:
    """On 3 elements, with gaps drawn 1 or 2 at a time (the loop over chunks taken), each of the 8 patterns comes
    out as often as independent draws give it."""
    torch.manual_seed(0)
    p, draws = 0.2, 20000
    for chunk in (1, 2):
        counts = torch.zeros(8)
        for _ in range(draws):
            m = keep_mask(torch.empty(3), p, chunk=chunk)
            counts[int(m[0]) * 4 + int(m[1]) * 2 + int(m[2])] += 1
        for pattern in range(8):
            kept = pattern.bit_count()
            expected = (1 - p) ** kept * p ** (3 - kept)
            assert abs(counts[pattern].item() / draws - expected) < 5 * (expected * (1 - expected) / draws) ** 0.5, (
                chunk, pattern)


def peft_lora(tiny_model: Path, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return nonzero_lora_b(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                          target_modules="all-linear", task_type="CAUSAL_LM")))


def nonzero_lora_b(model):
    """`model` with random LoRA B weights: a fresh B = 0 would leave every A gradient zero."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lean_model_equals_peft_dropout_with_the_same_masks(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lean, plain = peft_lora(tiny_model, 0.3), peft_lora(tiny_model, 0.3)
    assert lean_lora_dropout(lean) == 14  # 2 layers x 7 linear modules
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))

    masks: list[torch.Tensor] = []

    def recording(x, weight, p, mask=None):
        mask = torch.rand(x.shape) >= p
        masks.append(mask)
        return dropped_linear(x, weight, p, mask)

    monkeypatch.setattr(lean_module, "dropped_linear", recording)
    lean_loss, lean_grads = loss_and_grads(lean, ids)
    assert len(masks) == 14

    class Replay(torch.nn.Module):  # PEFT's dropout, fed the masks the lean model drew, in call order
        def forward(self, x):
            return x * masks.pop(0) / 0.7

    for module in plain.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = Replay()
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    assert not masks
    assert torch.allclose(lean_loss, plain_loss, atol=1e-6)
    assert lean_grads.keys() == plain_grads.keys()
    for name in lean_grads:
        assert torch.allclose(lean_grads[name], plain_grads[name], atol=1e-6), name
    # eval mode: no dropout on either side
    lean.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids).logits, peft_lora(tiny_model, 0.3).eval()(input_ids=ids).logits)


def saved_bytes(model, ids: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def test_lean_dropout_keeps_less_for_backward(tiny_model: Path) -> None:
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(3))
    plain, lean, none = peft_lora(tiny_model, 0.1), peft_lora(tiny_model, 0.1), peft_lora(tiny_model, 0.0)
    lean_lora_dropout(lean)
    plain_b, lean_b, none_b = saved_bytes(plain, ids), saved_bytes(lean, ids), saved_bytes(none, ids)
    # PEFT's dropout keeps a float copy per adapted module (q, k, v: three of the same input) plus its mask;
    # the lean one keeps one-byte masks only on top of what no dropout keeps.
    hidden, inter, tokens = 64, lean.config.intermediate_size, ids.numel()
    masks = tokens * (6 * hidden + inter) * 2  # 2 layers: q k v o gate up read hidden-wide inputs, down inter-wide
    a_weights = sum(p.numel() * 4 for n, p in lean.named_parameters() if "lora_A" in n)  # kept by every module
    assert lean_b <= none_b + masks + a_weights
    # at least the float copies of q, k, v (3 of one input: 2 more than one) and gate, up (2 of one: 1 more)
    assert plain_b - lean_b >= tokens * 2 * 3 * hidden * 4


def test_lean_adapter_saves_and_reloads_as_peft(tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lean = peft_lora(tiny_model, 0.3)
    keys = list(lean.state_dict())
    lean_lora_dropout(lean)
    assert list(lean.state_dict()) == keys
    assert sum(isinstance(m, DropoutLinear) for m in lean.modules()) == 14
    lean.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert again.peft_config["default"].lora_dropout == 0.3
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, lean.eval()(input_ids=ids).logits, atol=1e-6)


def test_attach_peft_uses_lean_dropout_for_lora_but_not_dora(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from align.models.peft import PeftSettings, attach_peft

    def attached(method: str):
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        return attach_peft(base, PeftSettings(method=method, r=4, alpha=8, dropout=0.1))[0]

    assert sum(isinstance(m, DropoutLinear) for m in attached("lora").modules()) == 14
    dora = attached("dora")  # DoRA reads its dropout module itself
    assert not any(isinstance(m, DropoutLinear) for m in dora.modules())
    assert any(type(m) is torch.nn.Dropout for m in dora.modules())


# ---------------------------------------------------------------- SwiGLU without its activation


def test_swiglu_values_and_gradients() -> None:
    from align.models.lean import swiglu

    gen = torch.Generator().manual_seed(5)
    gate = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    assert torch.allclose(swiglu(gate, up), torch.nn.functional.silu(gate) * up)


def test_lean_swiglu_model_equals_plain_and_keeps_less(tiny_model: Path) -> None:
    from align.models.lean import lean_swiglu

    lean, plain = peft_lora(tiny_model, 0.0), peft_lora(tiny_model, 0.0)
    assert lean_swiglu(lean) == 2  # one MLP per layer
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(6))
    lean_loss, lean_grads = loss_and_grads(lean, ids)
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    assert torch.allclose(lean_loss, plain_loss, atol=1e-6)
    for name in plain_grads:
        assert torch.allclose(lean_grads[name], plain_grads[name], atol=1e-6), name
    inter = lean.config.intermediate_size
    assert saved_bytes(plain, ids) - saved_bytes(lean, ids) == ids.numel() * 2 * inter * 4  # silu(gate), per layer


def test_lean_swiglu_leaves_other_mlps_alone() -> None:
    from align.models.lean import lean_swiglu

    class GeluMLP(torch.nn.Module):  # same attribute names, another forward
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 8), torch.nn.Linear(4, 8),
                                                            torch.nn.Linear(8, 4))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert lean_swiglu(GeluMLP()) == 0
