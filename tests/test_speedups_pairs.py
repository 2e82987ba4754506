"""Padding-free reward-model forwards (align/models/packed.py): the same scores and gradients as the padded
forward, with no padding token reaching the transformer body."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def classifier(tiny_model: Path, attn: str = "sdpa"):
    """The tiny Llama as a one-output reward model with a LoRA on every linear layer (as the reward stage has it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, attn_implementation=attn)
    model.config.pad_token_id = 0
    # a large score head: scores that depend on the context, so a leak across packed sequences shows
    model.score.weight.data.normal_(0.0, 1.0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
    for name, p in model.named_parameters():  # a LoRA B of zeros would give zero gradients to every A
        if "lora_B" in name:
            p.data.normal_(0.0, 0.1)
    return model


def pair_batch() -> dict[str, torch.Tensor]:
    """Two pairs as RewardTrainer collates them: chosen, chosen, rejected, rejected; right-padded with 0."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    gen = torch.Generator().manual_seed(1)
    lengths = [(9, 4), (13, 6)]
    rows = [{"chosen_ids": torch.randint(3, 1000, (c,), generator=gen).tolist(),
             "rejected_ids": torch.randint(3, 1000, (r,), generator=gen).tolist()} for c, r in lengths]
    return DataCollatorForPreference(pad_token_id=0)(rows)


def loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    scores = model(**batch, use_cache=False).logits[:, 0]
    chosen, rejected = scores.chunk(2)
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    loss.backward()
    return scores.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_reward_forward_equals_padded(tiny_model, one_thread, attn):
    from align.models.packed import padding_free_classifier

    model, batch = classifier(tiny_model, attn), pair_batch()
    model.train()
    plain_scores, plain_loss, plain_grads = loss_and_grads(model, batch)
    assert padding_free_classifier(model, {k: batch[k] for k in ("input_ids", "attention_mask")}) is True
    seen: list[int] = []
    embed = model.get_base_model().model.embed_tokens
    hook = embed.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    scores, loss, grads = loss_and_grads(model, batch)
    hook.remove()
    assert seen == [int(batch["attention_mask"].sum())] and seen[0] < batch["input_ids"].numel()  # no padding
    # fp32, the same sums in another order (one row of 32 tokens instead of 4 of 13): ~1e-7 relative;
    # a sequence attending to its packed neighbours moves these scores (std ~1) by far more
    torch.testing.assert_close(scores, plain_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and any(".score." in n for n in grads)
    for name, g in grads.items():
        # per tensor, relative to its norm: elements that are sums cancelling to ~0 differ by a few 1e-6 absolute;
        # fp32 sums reordered over ~32 tokens stay ~1e-6 of the norm, a leak across sequences moves it by O(1)
        assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name



def test_padding_free_reward_refused_when_packed_sequences_mix(tiny_model, one_thread, monkeypatch):
    import transformers.masking_utils as masking

    from align.models.packed import padding_free_classifier

    model, batch = classifier(tiny_model), pair_batch()
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # one causal row
    assert padding_free_classifier(model, {k: batch[k] for k in ("input_ids", "attention_mask")}) is False
    assert "forward" not in vars(model.get_base_model())  # left as it was


def test_left_padded_or_unmasked_calls_take_the_plain_forward(tiny_model, one_thread):
    from align.models.packed import padding_free_classifier, right_padded_lengths

    model, batch = classifier(tiny_model), pair_batch()
    assert padding_free_classifier(model, {k: batch[k] for k in ("input_ids", "attention_mask")}) is True
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert right_padded_lengths(left) is None
    assert right_padded_lengths(left.flip(-1)).tolist() == [2, 4]
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        seen: list[int] = []
        hook = model.get_base_model().model.embed_tokens.register_forward_hook(
            lambda module, args, out: seen.append(args[0].shape[0]))
        left_ids = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
        padded = model(input_ids=left_ids, attention_mask=left).logits
        hook.remove()
        assert seen == [2] and padded.shape == (2, 1)  # left padding: the plain batched forward, not one packed row
        assert model(input_ids=ids).logits.shape == (1, 1)  # no mask: the plain forward


def test_release_freed_memory_runs_after_each_step(monkeypatch):
    from align.models import memory

    assert memory.release_freed_memory() is True  # glibc (Linux): malloc_trim exists and ran
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    callback = memory.release_memory_callback()
    for _ in range(3):
        callback.on_step_end(None, None, None)
    assert calls == [1, 1, 1]


# ---- DPO: the compact LM head over packed rows (align.models.lm_head.pack_rows) ----

def dpo_twin(tiny_model: Path):
    from test_speedups import OUTPUTS, lora_model

    from align.models.lm_head import compact_lm_head

    model = lora_model(tiny_model)
    assert compact_lm_head(model, outputs=OUTPUTS) is True
    return model


def dpo_loss_and_grads(model, batch, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The sigmoid DPO loss as DPOTrainer computes it (rows: chosen then rejected; the reference is the adapter
    disabled), its per-token policy log-probs, and the LoRA gradients."""
    model.zero_grad()
    with torch.no_grad(), model.disable_adapter():
        ref = model(**batch, fused_lm_head=True).log_probs.sum(-1)
    out = model(**batch, fused_lm_head=True)
    logratio = out.log_probs.sum(-1) - ref
    chosen, rejected = logratio.chunk(2)
    loss = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
    loss.backward()
    return loss.detach(), out.log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}


def dpo_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two pairs, right-padded rows of 12, 9 (chosen) and 7, 5 (rejected) tokens; labels on all but the prompt."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([12, 9, 7, 5])
    attention = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (4, 12), generator=gen).masked_fill(attention == 0, 2)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_dpo_packed_rows_give_the_padded_loss_and_gradients(tiny_model, one_thread):
    from align.models.lm_head import pack_rows

    model = dpo_twin(tiny_model)
    batch = dpo_batch(model.config.vocab_size)
    model.train()
    plain_loss, plain_lp, plain_grads = dpo_loss_and_grads(model, batch)
    assert pack_rows(model, batch) is True and model.training
    seen: list[int] = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: seen.append(args[0].numel()))
    loss, lp, grads = dpo_loss_and_grads(model, batch)
    hook.remove()
    assert seen == [33, 33]  # reference and policy passes: the 33 real tokens of 4 x 12, no padding
    # fp32, the same sums in another order: ~1e-7 relative; per-token log-probs are ~ -10 (a 49k vocabulary)
    torch.testing.assert_close(lp, plain_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == plain_grads.keys() and grads
    for name, g in grads.items():  # relative to each tensor's norm, as for the reward model above
        assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name


def test_dpo_packing_refused_when_packed_sequences_mix(tiny_model, one_thread, monkeypatch):
    import transformers.masking_utils as masking

    from align.models.lm_head import PACK_FLAG, pack_rows

    model = dpo_twin(tiny_model)
    with torch.no_grad():  # a sharp head: next-token distributions that depend on the context
        model.get_base_model().lm_head.weight.normal_(0.0, 1.0)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # one causal row
    assert pack_rows(model, dpo_batch(model.config.vocab_size)) is False
    assert getattr(model.get_base_model(), PACK_FLAG) is False
