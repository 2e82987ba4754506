"""Weights laid out once for oneDNN, for models that are only sampled from on a CPU.

Decoding multiplies a few rows (one new token per sequence) by every weight matrix of the model, once per token.
torch's default CPU path for `F.linear` (MKL sgemm) lays the weight matrix out for its kernel again on every such
call; oneDNN can lay it out once (`mkldnn._reorder_linear_weight`) and multiply by that layout each step
(`mkldnn._linear_pointwise`, what torch.compile's CPU backend emits for frozen linear layers). Measured on this
project's 2-core AVX-512 CPU over the default model's 211 weight matrices: 16 rows 67-79 -> 33 ms (fp32) and 35 ->
19 ms (bf16), 1 row 41-44 -> 24 ms (fp32), 512 rows 756 -> 627 ms; results within 3e-6 of F.linear in fp32
(another summation order: equal to rounding, not bit for bit).

Inference only: a `PrepackedLinear` has no `.weight` and no gradient. `prepack_linears` swaps the nn.Linear
layers of a model that is only sampled from: build_sampler's (the generate stage, judges, serve; adapters are
merged by then) and PPO's rollout copy of a LoRA policy (`load` takes each update's merged weights). A layer's
original weight is freed, or paged out where it is memory-mapped from the model's file (`page_out`): the default
model's sampler peaked at 1529 MiB prepacked without that, against 1012 unpacked.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from align.models.memory import page_out

log = logging.getLogger(__name__)

ROWS_HINT = 16  # the row count oneDNN picks its layout for; other counts run on it too (timed above: 1 to 512)


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and takes weights of `dtype` (fp32 always; bf16 where the CPU has it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PrepackedLinear(torch.nn.Module):
    """`linear`'s y = x W^T + b with W in oneDNN's layout; x must have W's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.load(linear.weight)

    @torch.no_grad()
    def load(self, weight: torch.Tensor) -> None:
        """Take `weight` [out, in] (any float dtype: rounded to this layer's, as `copy_` would) as the new W."""
        # A plain attribute, not a buffer: an opaque oneDNN tensor has no storage for state_dict or .to() to use.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype).contiguous(), ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: torch.nn.Module) -> int:
    """Replace every CPU nn.Linear of `model` whose weight dtype oneDNN takes by a PrepackedLinear, in place; the
    number replaced. The model must not be trained afterwards (its linear layers have no weights left)."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
               and can_prepack(module.weight.dtype)]
    # Largest first: a weight's pages are resident from its reading until `page_out`, so the transient is the size
    # of the weight being packed on top of what is packed so far (the LM head's 113 MB on the default model).
    targets.sort(key=lambda item: -item[1].weight.numel())
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PrepackedLinear(module))
        page_out(module.weight)  # not read again (a tied embedding reads back the rows it looks up)
    return len(targets)


def prepacking_is_faster(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked weights decoded faster than F.linear here for `dtype` (`time_decode_step`):
    measured once per CPU model, torch version and thread count, and remembered (`measured_faster`)."""
    from align.models.load import measured_faster, time_decode_step

    if not can_prepack(dtype):
        return False
    name = str(dtype).removeprefix("torch.")
    return measured_faster(f"prepacked decode {name} v1", lambda: time_decode_step(dtype),
                           lambda: time_decode_step(dtype, prepacked=True), ("F.linear", "prepacked"))


def prepack_for_sampling(model: Any) -> Any:
    """`model` (on a CPU, only sampled from) with its linear layers prepacked where that measured faster."""
    dtype = next(model.parameters()).dtype
    if next(model.parameters()).device.type == "cpu" and prepacking_is_faster(dtype):
        count = prepack_linears(model)
        log.debug(f"prepacked {count} weight matrices for oneDNN")
    return model
