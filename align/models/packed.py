"""Padding-free forwards of right-padded batches: the real tokens of every row packed into one row.

A reward batch is 2 x batch sequences (chosen, then rejected) right-padded to the longest; on the demo pairs a
third of those positions are padding, and the transformer body computes and keeps activations for every one of
them. `packed_body` runs the body once over the attended tokens only, one row with position_ids restarting at 0
per sequence (transformers' sdpa/eager masks read the sequence boundaries from them, as for SFT's padding-free
batches), and puts the hidden states back in the padded layout (zeros at the padding). On the default model, one
training step of 8 pairs kept ~3.0 GB of live memory instead of ~3.9 GB and ran ~20% faster.

`padding_free_classifier` makes a sequence classifier (the reward model) do this inside its own forward, so
TRL's RewardTrainer, its loss and its metrics are untouched; the score is read where transformers reads it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

# arguments a padding-free forward honours at these values (PEFT passes return_dict=True and the output_* flags)
PLAIN_ARGS = {"use_cache": False, "return_dict": True, "output_attentions": False, "output_hidden_states": False}


def right_padded_lengths(attention_mask: Tensor) -> Tensor | None:
    """Row lengths [B] when every row of `attention_mask` [B, T] is ones then zeros (right padding), else None."""
    lengths = attention_mask.sum(-1)
    prefix = torch.arange(attention_mask.shape[-1], device=attention_mask.device) < lengths[:, None]
    return lengths if bool((attention_mask.bool() == prefix).all()) and bool((lengths > 0).all()) else None


def pack(input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(ids [1, N], position_ids [1, N]) of the first `lengths[i]` tokens of each row of `input_ids` [B, T]."""
    keep = torch.arange(input_ids.shape[-1], device=input_ids.device) < lengths[:, None]  # [B, T]
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    return input_ids[keep][None], positions[keep][None]


def packed_body(body: Any, input_ids: Tensor, lengths: Tensor, **kwargs: Any) -> Tensor:
    """Last hidden states [B, T, H] of the right-padded `input_ids` [B, T] (row i: `lengths[i]` real tokens) from
    one packed pass of `body` (a transformers base model); zeros at the padding positions."""
    ids, positions = pack(input_ids, lengths)
    hidden = body(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).last_hidden_state[0]  # [N, H]
    keep = torch.arange(input_ids.shape[-1], device=input_ids.device) < lengths[:, None]
    return hidden.new_zeros((*input_ids.shape, hidden.shape[-1])).masked_scatter(keep[..., None], hidden)


def pooled_index(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """Per row, where transformers' sequence classifiers read the score: the rightmost token that is not the pad
    token (the last position when there is no pad token). [B]"""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def padding_free_classifier(model: Any, probe: dict[str, Tensor]) -> bool:
    """Make `model` (a transformers XForSequenceClassification with a `score` head, or a PeftModel around one) run
    right-padded batches padding-free (`packed_body`); any other call (no mask, left padding, labels, a cache,
    embeddings given) takes the model's own forward. Checked, not assumed: on `probe` (a right-padded batch,
    input_ids + attention_mask) both forwards must give the same scores, else the model is left as it was (its
    attention would mix the packed sequences). True if patched."""
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(target, getattr(target, "base_model_prefix", ""), None)
    if body is None or not hasattr(target, "score") or "forward" in vars(target):
        return False
    plain = target.forward

    def forward(self: Any, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Any:
        lengths = None if input_ids is None or attention_mask is None else right_padded_lengths(attention_mask)
        others = {k for k, v in kwargs.items() if v is not None and PLAIN_ARGS.get(k, not v) != v}
        pooled = None if lengths is None else pooled_index(input_ids, self.config.get_text_config().pad_token_id)
        if lengths is None or others or bool((pooled >= lengths).any()):
            return plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = packed_body(body, input_ids, lengths)  # [B, T, H]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return SequenceClassifierOutputWithPast(logits=self.score(hidden[rows, pooled]))  # [B, num_labels]

    target.forward = types.MethodType(forward, target)
    if same_scores(model, plain, probe):
        return True
    del target.forward
    return False


def same_scores(model: Any, plain: Any, batch: dict[str, Tensor]) -> bool:
    """Does `model` (patched) score `batch` as its `plain` forward does? (eval mode, no gradient)"""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed, padded = model(**batch, use_cache=False).logits, plain(**batch, use_cache=False).logits
    finally:
        model.train(was_training)
    # fp32 agrees to ~1e-6 (the same sums in another order); sequences leaking into each other move scores by far more
    tolerance = 1e-4 if packed.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(packed.float(), padded.float(), rtol=tolerance, atol=tolerance))
