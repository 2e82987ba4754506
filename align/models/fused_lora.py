"""LoRA layers computed as one autograd node: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

PEFT's LoRA `Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the adapter's product, its scaled
copy and the sum are three new [tokens, out] tensors per adapted layer, and backward walks the same four nodes
(and adds the two input gradients into a third tensor). `lora_linear` computes the same thing in one node: the
adapter's product is added into the base output in place (`addmm_` with alpha = s), and in backward the adapter's
input gradient is added into the base one in place. It keeps x (shared by every layer that reads it), the
[tokens, r] product x Aᵀ and, with dropout, the one-byte mask (as `lean.dropped_linear` does). Same values up to
summation order (the scale is applied to the rank-r product instead of the [tokens, out] one), same gradients.

Taken only where it is exactly that sum: a vanilla LoRA on a plain `nn.Linear` (frozen weight and bias), one active
adapter, not merged or disabled, no LoRA bias, every tensor in x's dtype and no autocast, no hooks on the three
submodules, no DeepSpeed-partitioned weights (ZeRO-3 gathers them in the submodules' forward hooks). Anything else runs PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from align.models.lean import keep_mask


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s · ((x · mask / keep) Aᵀ) Bᵀ for x [..., in], W [out, in], A [r, in], B [out, r]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, mask: torch.Tensor | None, keep: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        dropped = flat if mask is None else flat * mask.reshape(flat.shape) / keep
        h = dropped @ lora_a.t()
        y = F.linear(flat, weight, bias)
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, h, mask)
        ctx.scaling, ctx.keep, ctx.x_shape = scaling, keep, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = (g @ lora_b).mul_(ctx.scaling)  # dL/d(x Aᵀ), [tokens, r]
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(ctx.scaling)
        if ctx.needs_input_grad[3]:
            grad_a = grad_h.t() @ (flat if mask is None else flat * mask.reshape(flat.shape) / ctx.keep)
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(grad_h, lora_a)
            else:
                grad_x.add_((grad_h @ lora_a).mul_(mask.reshape(flat.shape)), alpha=1.0 / ctx.keep)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, p: float = 0.0) -> torch.Tensor:
    """x Wᵀ + b + scaling · (dropout(x, p) Aᵀ) Bᵀ, with W and b frozen (no gradient is returned for them)."""
    mask = None if p == 0 else keep_mask(x, p)
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, mask, 1.0 - p)


def _plain(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is None or (t.dtype == dtype and not hasattr(t, "ds_id") and type(t.data) is torch.Tensor)


def _adapter(layer: Any, x: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module, float] | None:
    """(lora_A, lora_B, dropout p) of the one active vanilla adapter when `layer`'s forward is exactly
    `lora_linear`; None where PEFT's own forward must run."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1 or layer.fan_in_fan_out:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if name not in layer.lora_A or name in layer.lora_variant or type(base) is not torch.nn.Linear:
        return None
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if any(m._forward_hooks or m._forward_pre_hooks for m in (base, lora_a, lora_b)):  # e.g. accelerate offloading
        return None
    if lora_a.bias is not None or lora_b.bias is not None or base.weight.requires_grad or (
            base.bias is not None and base.bias.requires_grad):
        return None
    if isinstance(dropout, torch.nn.Dropout):
        if dropout.p > 0 and dropout.training:
            return None
    elif not isinstance(dropout, torch.nn.Identity):
        return None
    if torch.is_autocast_enabled(x.device.type) or not all(
            _plain(t, x.dtype) for t in (base.weight, base.bias, lora_a.weight, lora_b.weight)):
        return None
    # `lean.DropoutLinear` (lora_A applying the dropout itself) drops only in training mode
    return lora_a, lora_b, getattr(lora_a, "dropout_p", 0.0) if lora_a.training else 0.0


def fuse_lora(model: Any) -> int:
    """Give every PEFT LoRA `Linear` over a plain `nn.Linear` in `model` the one-node forward (it falls back to
    PEFT's forward per call wherever that is not the same computation). Returns how many layers changed."""
    from peft.tuners.lora.layer import Linear

    changed = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear:
            module.__class__ = _fused_class()
            changed += 1
    return changed


_FUSED: dict[str, type] = {}


def _fused_class() -> type:
    """`FusedLoraLinear`, a subclass of PEFT's LoRA Linear (built on first use: peft is imported lazily)."""
    if "cls" not in _FUSED:
        from peft.tuners.lora.layer import Linear

        class FusedLoraLinear(Linear):
            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                adapter = None if args or kwargs else _adapter(self, x)
                if adapter is None:
                    return super().forward(x, *args, **kwargs)
                lora_a, lora_b, p = adapter
                base = self.base_layer
                return lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                   self.scaling[self.active_adapters[0]], p)

        _FUSED["cls"] = FusedLoraLinear
    return _FUSED["cls"]
