"""The LM head of the TRL trainers (SFT, DPO) on CPU: project only the positions that have a label.

TRL 1.x patches the model so `model(..., labels=..., fused_lm_head=True)` returns per-token log-probabilities.
On CUDA it scores only the labelled positions (a Triton kernel); elsewhere it scores every position, padding and
prompt included, in vocabulary tiles that its backward projects a second time. On this project's home ground (a
CPU, a 49k vocabulary, loss on the answer only) that head took ~38% of an SFT step. `compact_lm_head` swaps in
the same computation done once on the labelled positions only: one matmul, one log-softmax, exact, same outputs.

Only where it is the same function: CPU, temperature 1, no logit soft-capping or scaling, no MoE router loss
(otherwise TRL's own head stays). Entropy, mean logits and top-1 are metrics here and carry no gradient.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from align.models.packed import PLAIN_ARGS, packed_body, packed_lengths, right_padded_lengths, segments_body

SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def plain_head(model: Any) -> bool:
    """True when the model's logits are just `lm_head(hidden)` (what `compact_lm_head` computes)."""
    config = model.config.get_text_config()
    return (all(getattr(config, k, None) in (None, 1.0) for k in SCALING_KEYS)
            and not getattr(config, "output_router_logits", False))


def compact_logprobs(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                     outputs: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    """Per-token fields at the next-token `labels` (-100: ignored) from `hidden` (same leading shape), each zero
    where ignored: log_probs (with gradient) and any of entropy / mean_logits / is_top1 named in `outputs`."""
    mask = labels != -100
    logits = lm_head(hidden[mask]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    target = labels[mask]
    picked = log_probs.gather(1, target[:, None])[:, 0]
    fields: dict[str, torch.Tensor | None] = {"log_probs": picked}
    with torch.no_grad():
        fields["entropy"] = -(log_probs.exp() * log_probs).sum(-1) if "entropy" in outputs else None
        fields["mean_logits"] = logits.mean(-1) if "mean_logits" in outputs else None
        fields["is_top1"] = logits.argmax(-1) == target if "is_top1" in outputs else None
    # masked_scatter keeps an all-ignored batch connected to the graph (a differentiable zero, as TRL does)
    return {k: None if v is None else v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in fields.items()}


def compact_lm_head(model: Any, outputs: tuple[str, ...] = ("log_probs",)) -> bool:
    """Replace TRL's fused LM-head forward on `model` (a PeftModel or a plain model, already patched by the
    trainer) by the compact one, when it computes the same thing (see the module doc). True if replaced."""
    from trl.trainer.utils import FusedCausalLMOutput

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    patched = "forward" in vars(target)  # the trainer's add_fused_lm_head sets an instance-level forward
    if not patched or next(target.parameters()).device.type != "cpu" or not plain_head(target) \
            or set(outputs) - {"log_probs", "entropy", "mean_logits", "is_top1"}:
        return False
    trl_forward = target.forward

    @functools.wraps(type(target).forward)  # `generate` reads the signature (position_ids, logits_to_keep)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               **kwargs)
        kwargs["use_cache"] = False
        hidden = packed_hidden(self, kwargs) if not args else None
        if hidden is None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        f = compact_logprobs(hidden, shift_labels, self.get_output_embeddings(), outputs)
        count = (shift_labels != -100).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-f["log_probs"].sum() / count, log_probs=f["log_probs"], entropy=f["entropy"],
                                   mean_logits=f["mean_logits"], is_top1=f["is_top1"], label_mask=shift_labels != -100)

    target.forward = types.MethodType(forward, target)
    return True


PACK_FLAG = "_align_packed_rows"  # set by `pack_rows`: run right-padded batches padding-free
# what TRL's padding-free collator adds for varlen attention kernels: boundaries of its one packed row, which
# `segments_body` re-lays in rows of its own (the CPU's sdpa/eager attention reads them from position_ids)
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def packed_hidden(model: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The body's last hidden states of a padding-free call, from packed rows (`align.models.packed`): a right-padded
    batch once `pack_rows` switched it on, or TRL's padding-free batch (one row, position_ids per sequence). None
    for any other call: the model's own forward runs it."""
    if getattr(model, PACK_FLAG, False) and packable(kwargs) is not None:
        return packed_body(model.base_model, kwargs["input_ids"], kwargs["attention_mask"].bool())
    ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
    others = {k for k, v in kwargs.items() if k not in ("input_ids", "position_ids", *VARLEN_KEYS) and v is not None
              and (torch.is_tensor(v) or PLAIN_ARGS.get(k, not v) != v)}
    lengths = None if ids is None or positions is None or others else packed_lengths(ids, positions)
    return None if lengths is None else segments_body(model.base_model, ids[0], lengths)[None]


def packable(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Row lengths when a call is just input_ids + a right-padded attention_mask (+ use_cache), else None."""
    others = {k for k, v in kwargs.items() if k not in ("input_ids", "attention_mask") and v is not None
              and PLAIN_ARGS.get(k, not v) != v}  # PEFT passes return_dict=True, output_*=None
    if others or kwargs.get("attention_mask") is None or kwargs.get("input_ids") is None:
        return None
    return right_padded_lengths(kwargs["attention_mask"])


def pack_rows(model: Any, probe: dict[str, torch.Tensor]) -> bool:
    """Make a `compact_lm_head` model run right-padded batches padding-free (`align.models.packed.packed_body`):
    the body sees only the attended tokens, in packed rows. Checked, not assumed: the log-probs of `probe`
    (input_ids, attention_mask, labels) must equal the padded pass's, else it stays padded. True if switched on."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "forward" not in vars(target):
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = []
            for flag in (False, True):
                setattr(target, PACK_FLAG, flag)
                outs.append(model(**probe, fused_lm_head=True).log_probs.float())
    finally:
        model.train(was_training)
    # fp32: the same sums in another order (~1e-6); attention leaking across packed sequences moves them far more
    tolerance = 1e-4 if outs[0].dtype == torch.float32 and next(target.parameters()).dtype == torch.float32 else 3e-2
    same = bool(torch.allclose(outs[0], outs[1], rtol=tolerance, atol=tolerance))
    setattr(target, PACK_FLAG, same)
    return same


def contiguous_head_input(model: Any) -> None:
    """Hand the model's LM head a contiguous input. transformers projects a slice of the hidden states
    (`logits_to_keep`); with no tensor needing a gradient, torch's matmul does not fold that strided [B, T, H] input
    into one matmul but copies the [V, H] weight once per row for a batched one. A no-grad bf16 pass of the default
    model over 8 x 104 tokens took 0.70 s with the copy and 0.44 s without (fp32: 1.25 s either way)."""
    head = model.get_output_embeddings()
    if head is not None and _contiguous not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous)


def _contiguous(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])
