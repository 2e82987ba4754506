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


@pytest.mark.parametrize("row_tokens, positions", [(256, 33), (12, 36)])  # one row of 33; rows [12], [9], [7, 5]
def test_dpo_packed_rows_give_the_padded_loss_and_gradients(tiny_model, one_thread, monkeypatch, row_tokens,
                                                            positions):
    from align.models import packed
    from align.models.lm_head import pack_rows

    monkeypatch.setattr(packed, "ROW_TOKENS", row_tokens)
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
    assert seen == [positions, positions]  # reference and policy passes: the 33 real tokens of 4 x 12 (+ row tails)
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


# ---- packed rows (align.models.packed.segments_body): several rows, not one, with the padded pass's numbers ----


def test_row_plan_fills_rows_evenly_longest_first():
    from align.models.packed import row_plan

    # 38 tokens / 10 -> 4 rows; 12, 9, 7, 5 open them; 3 joins the 5 (lightest), 2 joins the 7 (then lightest)
    assert row_plan([5, 9, 3, 7, 12, 2], 10) == [[4], [1], [3, 5], [0, 2]]
    assert row_plan([3, 4, 2], 256) == [[1, 0, 2]]
    assert row_plan([300, 5], 256) == [[0], [1]]  # never more rows than sequences; a long one gets its own


def both_sides_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Five sequences of 6, 9, 4, 11 and 7 tokens in rows of 14, left and right padded (as PPO rollouts are)."""
    gen = torch.Generator().manual_seed(4)
    left, lengths = torch.tensor([3, 0, 5, 2, 7]), torch.tensor([6, 9, 4, 11, 7])
    cols = torch.arange(14)
    keep = (cols >= left[:, None]) & (cols < (left + lengths)[:, None])
    return torch.randint(3, vocab, (5, 14), generator=gen).masked_fill(~keep, 0), keep


def hidden_and_grads(model, weights, keep, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`run()`'s hidden states at the real tokens (`keep`) and the gradients of a fixed weighted sum of them."""
    model.zero_grad()
    hidden = run()
    (hidden * weights)[keep].sum().backward()
    return hidden.detach()[keep], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("leak", [False, True])
def test_packed_rows_give_the_padded_hidden_states_and_gradients(tiny_model, one_thread, monkeypatch, leak):
    import transformers.masking_utils as masking
    from transformers import AutoModelForCausalLM

    from align.models import packed

    monkeypatch.setattr(packed, "ROW_TOKENS", 12)  # 37 / 12 -> rows [11], [9], [7], [6, 4]: one with two
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids, keep = both_sides_padded(model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(5))

    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    plain, plain_grads = hidden_and_grads(model, weights, keep, lambda: model.model(
        input_ids=ids, attention_mask=keep.long(), position_ids=positions).last_hidden_state)
    if leak:  # attention that ignores the packed boundaries: what the check must tell apart
        monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    shapes: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    hidden, grads = hidden_and_grads(model, weights, keep, lambda: packed.packed_body(model.model, ids, keep))
    hook.remove()
    assert shapes == [(4, 11)]  # 37 real tokens in 4 rows of 11, instead of 5 x 14 padded or 1 x 37
    close = torch.allclose(hidden, plain, rtol=1e-5, atol=1e-5)
    assert close is not leak
    if not leak:
        for name, g in grads.items():  # fp32 sums in another order: ~1e-6 of each tensor's norm
            assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name


def test_trls_padding_free_batch_runs_in_rows_with_trls_numbers(tiny_model, one_thread, monkeypatch):
    from test_speedups import lora_grads, packed_rows, twin_models
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from align.models import packed

    monkeypatch.setattr(packed, "ROW_TOKENS", 16)  # 33 / 16 -> rows 15 | 11 | 7: TRL's one row of 33 re-laid
    trl, ours = twin_models(tiny_model)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(packed_rows())
    assert packed.packed_lengths(batch["input_ids"], batch["position_ids"]) == [11, 7, 15]
    shapes: list[tuple[int, ...]] = []
    ours.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape)))
    outs = []
    for model in (trl, ours):
        model.zero_grad()
        out = model(**batch, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        outs.append((out, lora_grads(model)))
    assert shapes == [(3, 15)]
    (a, a_grads), (b, b_grads) = outs
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-5, atol=1e-5)
    for name, g in b_grads.items():
        assert (g - a_grads[name]).norm() <= 1e-5 * a_grads[name].norm(), name


def test_packed_lengths_reads_only_trls_one_row_layout():
    from align.models.packed import packed_lengths

    ids = torch.zeros(1, 7, dtype=torch.long)
    assert packed_lengths(ids, torch.tensor([[0, 1, 2, 0, 1, 0, 1]])) == [3, 2, 2]
    assert packed_lengths(ids, torch.tensor([[1, 2, 3, 0, 1, 0, 1]])) is None  # does not start a sequence
    assert packed_lengths(ids, torch.tensor([[0, 1, 3, 0, 1, 0, 1]])) is None  # a gap inside a sequence
    assert packed_lengths(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2], [0, 1, 2]])) is None


# ---- shared first tokens (align.models.packed.prefix_forest): computed once, the padded pass's numbers ----


def test_prefix_forest_joins_longest_common_prefixes_first_within_the_budget():
    from align.models.packed import common_prefix, prefix_forest

    t = torch.tensor
    assert common_prefix(t([1, 2, 3]), t([1, 2, 4, 5])) == 2 and common_prefix(t([1, 2]), t([1, 2, 9])) == 2
    assert common_prefix(t([7]), t([1])) == 0
    # 0 and 2 share 4 tokens (a prompt), 1 and 3 share 3, 0 and 1 share 1 (a system token); 4 shares nothing
    seqs = [t([9, 1, 1, 1, 5, 5]), t([9, 2, 2, 6, 6]), t([9, 1, 1, 1, 7]), t([9, 2, 2, 8, 8, 8]), t([4, 4])]
    forest = prefix_forest(seqs, budget=100)
    assert forest.groups == [[0, 2, 1, 3], [4]]
    assert forest.parent == [-1, 0, 0, 1, -1] and forest.shared == [0, 1, 4, 3, 0]
    lengths = [len(s) for s in seqs]
    assert [forest.size(g, lengths) for g in forest.groups] == [6 + 1 + 4 + 3, 2]  # 22 tokens, 8 shared
    # a budget of 8: the pairs (6 + 5 - 4 = 7, 5 + 6 - 3 = 8) join, the pairs' pair (15 tokens) does not, as one
    # row of 15 costs more attention (225) than rows of 7 and 8 (113)
    tight = prefix_forest(seqs, budget=8)
    assert tight.groups == [[0, 2], [1, 3], [4]] and tight.shared == [0, 0, 4, 3, 0]


def shared_prompt_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pairs as a DPO/reward batch lays them (chosen, chosen, rejected, rejected), right-padded to 14: each
    pair's answers follow the same prompt (5 and 7 tokens), and every sequence opens with the same 2-token
    "system turn"."""
    gen = torch.Generator().manual_seed(6)
    system = torch.randint(3, vocab, (2,), generator=gen)
    prompts = [torch.cat([system, torch.randint(3, vocab, (n,), generator=gen)]) for n in (3, 5)]
    answers = [(6, 4), (7, 2)]  # (chosen, rejected) tokens per pair
    seqs = [torch.cat([prompts[p], torch.randint(3, vocab, (answers[p][side],), generator=gen)])
            for side in (0, 1) for p in (0, 1)]
    ids = torch.zeros(4, 14, dtype=torch.long)
    keep = torch.zeros(4, 14, dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], keep[row, :len(s)] = s, True
    return ids, keep


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompts_are_computed_once_with_the_padded_numbers(tiny_model, one_thread, attn):
    from transformers import AutoModelForCausalLM

    from align.models import packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    ids, keep = shared_prompt_batch(model.config.vocab_size)  # 11 + 14 + 9 + 9 = 43 tokens
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(7))

    plain, plain_grads = hidden_and_grads(model, weights, keep, lambda: model.model(
        input_ids=ids, attention_mask=keep.long()).last_hidden_state)
    seen: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    hidden, grads = hidden_and_grads(model, weights, keep, lambda: packed.packed_body(model.model, ids, keep))
    # the pairs' prompts (5, 7) once each, then the shared system turn (2) once: 43 - 14 = 29 tokens in one row
    assert seen == [29]
    torch.testing.assert_close(hidden, plain, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():  # fp32 sums in another order: ~1e-6 of each tensor's norm
        assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name


def causal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdpa attention that drops a ready 4-D mask and attends causally over the whole row (a kernel that knows
    no custom masks): the shared-prefix layout then mixes sequences, which the checks must tell apart."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def ignore_mask(module, query, key, value, attention_mask, **kwargs):
        return sdpa(module, query, key, value, None, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", ignore_mask)


@pytest.mark.parametrize("leak", [False, True])
def test_dpo_packing_with_shared_prompts_checked(tiny_model, one_thread, monkeypatch, leak):
    from align.models.lm_head import pack_rows

    model = dpo_twin(tiny_model)
    with torch.no_grad():  # a sharp head: next-token distributions that depend on the context
        model.get_base_model().lm_head.weight.normal_(0.0, 1.0)
    ids, keep = shared_prompt_batch(model.config.vocab_size)
    labels = ids.masked_fill(~keep, -100)
    labels[:, :7] = -100  # loss on the answers
    batch = {"input_ids": ids, "attention_mask": keep.long(), "labels": labels}
    if leak:
        causal_only(monkeypatch)
    assert pack_rows(model, batch) is not leak
    if not leak:
        model.train()
        seen: list[int] = []
        model.get_base_model().model.embed_tokens.register_forward_hook(
            lambda module, args, out: seen.append(args[0].numel()))
        dpo_loss_and_grads(model, batch)
        assert seen == [29, 29]  # reference and policy passes


def test_reward_packing_with_shared_prompts_checked(tiny_model, one_thread, monkeypatch):
    from align.models.packed import padding_free_classifier

    model = classifier(tiny_model)
    ids, keep = shared_prompt_batch(model.config.vocab_size)
    probe = {"input_ids": ids, "attention_mask": keep.long()}
    causal_only(monkeypatch)
    assert padding_free_classifier(model, probe) is False
    monkeypatch.undo()
    assert padding_free_classifier(model, probe) is True


def test_packed_rows_give_the_same_numbers_in_any_row_order(tiny_model, one_thread):
    """The rows are laid out from the sequences sorted by their tokens: a shuffled minibatch of the same sequences
    computes bit for bit what the batch in its own order did (hidden states and gradients)."""
    from transformers import AutoModelForCausalLM

    from align.models import packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids, keep = shared_prompt_batch(model.config.vocab_size)
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(11))

    def run(order: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        hidden = packed.packed_body(model.model, ids[order], keep[order])
        (hidden * weights[order]).sum().backward()
        return hidden.detach()[order.argsort()], {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}

    first, first_grads = run(torch.arange(4))
    for order in ([3, 1, 0, 2], [2, 3, 1, 0]):
        hidden, grads = run(torch.tensor(order))
        assert torch.equal(hidden, first)
        assert all(torch.equal(g, first_grads[n]) for n, g in grads.items())


def test_identical_and_contained_sequences_read_their_partners_tokens(tiny_model, one_thread):
    """A rejected answer equal to the chosen one (or both cut to the prompt by max_length) computes nothing of its
    own; a sequence that is the start of another reads that one's hidden states. Same numbers as the padded pass."""
    from transformers import AutoModelForCausalLM

    from align.models import packed

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(12)
    long = torch.randint(3, model.config.vocab_size, (10,), generator=gen)
    seqs = [long, long.clone(), long[:6], torch.randint(3, model.config.vocab_size, (5,), generator=gen)]
    ids = torch.zeros(4, 10, dtype=torch.long)
    keep = torch.zeros(4, 10, dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], keep[row, :len(s)] = s, True
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=gen)
    plain, plain_grads = hidden_and_grads(model, weights, keep, lambda: model.model(
        input_ids=ids, attention_mask=keep.long()).last_hidden_state)
    seen: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    hidden, grads = hidden_and_grads(model, weights, keep, lambda: packed.packed_body(model.model, ids, keep))
    assert seen == [15]  # the 10 tokens once, the unrelated 5: one row
    torch.testing.assert_close(hidden, plain, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name
