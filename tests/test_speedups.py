"""The speed-ups compute the same thing as what they replace: the compact LM head (vs TRL's fused head),
padding-free SFT batches (vs padded ones), our nucleus draw (vs transformers' warpers) and the adapter-disabled
DPO reference (vs TRL's "ref" adapter copy)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


# ---------------------------------------------------------------- compact LM head (align/models/lm_head.py)


def lora_model(tiny_model: Path, *, trl_head: bool = True, **config: object):
    """The tiny Llama with TRL's fused head (as the trainers add it) under a LoRA whose B is random (a fresh
    B = 0 would leave every A gradient zero, so the gradient check would see half the adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for k, v in config.items():
        setattr(base.config, k, v)
    if trl_head:
        add_fused_lm_head(base, outputs=OUTPUTS)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def twin_models(tiny_model: Path):
    """(TRL's head, compact head): the same weights, the same adapter. Built twice rather than deep-copied: TRL's
    patched forward closes over the original model's bound forward, which a deep copy would share."""
    from align.models.lm_head import compact_lm_head

    trl, ours = lora_model(tiny_model), lora_model(tiny_model)
    ours.load_state_dict(trl.state_dict())
    assert compact_lm_head(ours, outputs=OUTPUTS) is True
    return trl, ours


def sft_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Three right-padded rows of lengths 12, 9, 6; labels only on each row's answer (-100 on prompt + padding)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    attention = torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 6 + [0] * 6])
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": ids.masked_fill(attention == 0, 2), "attention_mask": attention, "labels": labels}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 5])
def test_compact_head_gives_trls_outputs_and_gradients(tiny_model, one_thread, monkeypatch, num_items):
    import trl.trainer.utils as trl_utils

    trl, ours = twin_models(tiny_model)
    batch = sft_batch(trl.config.vocab_size)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = trl(**batch, fused_lm_head=True, **kwargs)
    want.loss.backward()

    class NoKernel:  # the compact head must not fall back to TRL's kernel
        @staticmethod
        def apply(*args: object) -> None:
            raise AssertionError("TRL's chunked kernel ran under the compact head")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", NoKernel)
    got = ours(**batch, fused_lm_head=True, **kwargs)
    got.loss.backward()

    assert torch.equal(got.label_mask, batch["labels"][:, 1:] != -100) and torch.equal(got.label_mask, want.label_mask)
    assert int(got.label_mask.sum()) == 8 + 5 + 2
    for field in ("loss", "log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, field).detach(), getattr(want, field).detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.is_top1, want.is_top1)
    assert float(got.log_probs.detach()[~got.label_mask].abs().sum()) == 0.0  # zero where ignored
    want_grads, got_grads = lora_grads(trl), lora_grads(ours)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 2 * 7 * 2  # A, B × 7 linears × 2 layers
    for name, g in want_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_compact_head_with_pre_shifted_labels(tiny_model, one_thread):
    trl, ours = twin_models(tiny_model)
    batch = sft_batch(trl.config.vocab_size)
    labels = batch.pop("labels")
    shift = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)  # what context parallelism passes
    want = trl(**batch, shift_labels=shift, fused_lm_head=True)
    got = ours(**batch, shift_labels=shift, fused_lm_head=True)
    assert got.log_probs.shape == (3, 12)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_compact_head_on_an_all_ignored_batch_is_a_differentiable_zero(tiny_model, one_thread):
    _, ours = twin_models(tiny_model)
    batch = sft_batch(ours.config.vocab_size)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    out = ours(**batch, fused_lm_head=True)
    assert out.loss.requires_grad and float(out.loss.detach()) == 0.0
    assert out.log_probs.shape == (3, 11) and not out.label_mask.any()
    out.loss.backward()
    assert all(torch.isfinite(g).all() for g in lora_grads(ours).values())


def test_compact_head_without_fused_flag_is_the_plain_forward(tiny_model, one_thread):
    trl, ours = twin_models(tiny_model)
    batch = sft_batch(trl.config.vocab_size)
    with torch.no_grad():
        want, got = trl(**batch), ours(**batch)
    assert got.logits.shape == (3, 12, trl.config.vocab_size)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("case", ["softcapping", "logit_scale", "log_sum_sq_probs", "not_patched"])
def test_compact_head_keeps_trls_head_where_it_would_differ(tiny_model, case):
    from align.models.lm_head import compact_lm_head

    config = {"softcapping": {"final_logit_softcapping": 30.0}, "logit_scale": {"logit_scale": 0.5}}.get(case, {})
    model = lora_model(tiny_model, trl_head=case != "not_patched", **config)
    base = model.get_base_model()
    before = vars(base).get("forward")
    outputs = (*OUTPUTS, "log_sum_sq_probs") if case == "log_sum_sq_probs" else OUTPUTS
    assert compact_lm_head(model, outputs=outputs) is False
    assert vars(base).get("forward") is before  # TRL's forward (or none) left in place


def tiny_gpt2():
    """A model with absolute position embeddings: left padding changes its outputs unless position_ids follow
    the attention mask (RoPE models are shift-invariant, so they cannot show this)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()


def generation_scores(model) -> list[torch.Tensor]:
    ids = torch.tensor([[0, 0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]])
    attention = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [1] * 7])
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    return list(out.scores)


def test_generation_after_compact_head_is_unchanged():
    from trl.trainer.utils import add_fused_lm_head

    from align.models.lm_head import compact_lm_head

    plain, patched = tiny_gpt2(), tiny_gpt2()
    want = generation_scores(plain)
    add_fused_lm_head(patched)
    assert compact_lm_head(patched) is True
    for got, expected in zip(generation_scores(patched), want):
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- padding-free SFT (align/training.py, sft.py)


def packed_rows() -> list[dict[str, list[int]]]:
    """Three examples of different lengths, loss on all but the first three tokens of each."""
    gen = torch.Generator().manual_seed(2)
    rows = []
    for n in (11, 7, 15):
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def sharp_llama(tiny_model: Path, attn: str = "sdpa"):
    """The tiny Llama with an untied, large LM head: peaked next-token distributions that depend on the context.
    (With the tied 0.02-scale head every distribution is near uniform and attention that leaks across packed rows
    moves the loss by < 0.1%, inside `padding_free_matches`' tolerance.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    model.config.tie_word_embeddings = False
    gen = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen))
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sharp", [False, True])
def test_padding_free_matches_on_llama(tiny_model, one_thread, attn, sharp):
    from transformers import AutoModelForCausalLM

    from align.training import padding_free_matches

    model = sharp_llama(tiny_model, attn) if sharp else AutoModelForCausalLM.from_pretrained(tiny_model,
                                                                                             attn_implementation=attn)
    model.train()
    assert padding_free_matches(model, packed_rows()) is True
    assert model.training  # put back as it was


class DropPositions(torch.nn.Module):
    """A model whose attention cannot see packed boundaries: position_ids never reach it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: object) -> object:
        kwargs.pop("position_ids", None)
        return self.inner(**kwargs)


@pytest.mark.parametrize("how", ["boundaries_ignored", "positions_dropped"])
def test_padding_free_refused_when_attention_crosses_packed_rows(tiny_model, one_thread, monkeypatch, how):
    import transformers.masking_utils as masking

    from align.training import padding_free_matches

    model = sharp_llama(tiny_model)
    if how == "boundaries_ignored":
        monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    else:
        model = DropPositions(model)
    assert padding_free_matches(model, packed_rows()) is False


def run_sft(tiny_model: Path, data: tuple[Path, Path], out: Path, *overrides: str) -> Path:
    from align.config import load_config
    from align.stages import sft

    train, valid = data
    # No LoRA dropout: its masks are drawn per tensor shape, so padded and packed steps would see other noise.
    cfg = load_config(sft.Config, Path("stages/tiny/sft.yaml"),
                      [f"model={tiny_model}", f"output_dir={out}", f"data.train={train}", f"data.validation={valid}",
                       "train.progress=false", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
                       "peft.dropout=0.0", *overrides])
    return sft.run(cfg)


def first_step(run_dir: Path) -> dict[str, float]:
    state = max((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    return next(h for h in json.loads(state.read_text())["log_history"] if h.get("step") == 1 and "loss" in h)


def test_padding_free_sft_gives_the_padded_losses(tiny_model, toy_sft, tmp_path, one_thread, monkeypatch, capsys):
    from align.stages import sft

    chosen: list[bool] = []
    real = sft.use_padding_free
    monkeypatch.setattr(sft, "use_padding_free", lambda *a: chosen.append(real(*a)) or chosen[-1])
    free = run_sft(tiny_model, toy_sft, tmp_path / "free", "data.padding_free=true")
    free_out = capsys.readouterr().err  # status lines are logged to stderr
    padded = run_sft(tiny_model, toy_sft, tmp_path / "padded", "data.padding_free=false")
    assert chosen == [True, False]
    assert "padded batches" not in free_out

    m_free, m_padded = (json.loads((d / "manifest.json").read_text())["metrics"] for d in (free, padded))
    assert m_free["eval_loss_before"] == pytest.approx(m_padded["eval_loss_before"], rel=1e-4)
    s_free, s_padded = first_step(free), first_step(padded)
    assert s_free["loss"] == pytest.approx(s_padded["loss"], rel=1e-4)
    assert s_free["grad_norm"] == pytest.approx(s_padded["grad_norm"], rel=1e-3)


def test_prompt_tuning_falls_back_to_padded_batches(tiny_model, toy_sft, tmp_path, one_thread, capsys):
    run_sft(tiny_model, toy_sft, tmp_path / "pt", "peft.method=prompt_tuning", "train.max_steps=1")
    assert "sft: padded batches (peft.method=prompt_tuning)" in capsys.readouterr().err


# ---------------------------------------------------------------- nucleus draw (align/generation/hf.py)


def nucleus_probs(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What transformers samples from: Temperature then TopP warper, softmax (0 outside the nucleus)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    s = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_p < 1.0:
        s = TopPLogitsWarper(top_p)(None, s)
    return torch.softmax(s, dim=-1)


def check_draws(scores: torch.Tensor, temperature: float, top_p: float, n: int, tolerance: float = 0.03) -> None:
    """`n` draws per row lie in the warpers' nucleus and land with its renormalised probabilities."""
    from align.generation.hf import draw_tokens

    want = nucleus_probs(scores, temperature, top_p)
    torch.manual_seed(0)
    drawn = draw_tokens(scores.repeat_interleave(n, dim=0), temperature, top_p).view(len(scores), n)
    assert (want.gather(1, drawn) > 0).all(), "a token outside the nucleus was drawn"
    freq = torch.zeros_like(want).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=want.dtype)) / n
    assert ((freq > 0) | (want < 10 / n)).all(), "a nucleus token expected 10+ times was never drawn"
    assert float((freq - want).abs().max()) < tolerance


def toy_logits(vocab: int, peaked: int, flat: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(vocab, generator=gen) * 0.3 for _ in range(flat)]
    for _ in range(peaked):
        row = torch.randn(vocab, generator=gen)
        row[torch.randperm(vocab, generator=gen)[:4]] += torch.tensor([9.0, 8.5, 8.0, 7.0])
        rows.append(row)
    return torch.stack(rows)


def top_mass(scores: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    return torch.softmax(scores / temperature, -1).topk(k, -1).values.sum(-1)


def test_draw_keeps_the_boundary_exactly(monkeypatch):
    """p = .5 .3 .15 .05, top_p = .7: the second token is kept (.5 above it < .7), the third is not (.8 >= .7)."""
    from align.generation import hf

    monkeypatch.setattr(hf, "CANDIDATES", 3)
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()
    torch.testing.assert_close(nucleus_probs(scores, 1.0, 0.7), torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    check_draws(scores, 1.0, 0.7, n=4000)


@pytest.mark.parametrize("candidates", [8, 1024])
@pytest.mark.parametrize("peaked_only", [True, False])
@pytest.mark.parametrize("vocab", [50, 5000])
def test_draw_matches_transformers_nucleus(monkeypatch, candidates, peaked_only, vocab):
    from align.generation import hf

    monkeypatch.setattr(hf, "CANDIDATES", candidates)
    temperature, top_p = 0.7, 0.8
    scores = toy_logits(vocab, peaked=3, flat=0 if peaked_only else 2)
    # Which path runs: the top candidates when they hold top_p for every row, else the full sort.
    k = min(candidates, vocab)
    assert bool((top_mass(scores, temperature, k) >= top_p).all()) == (peaked_only or k == vocab)
    # Fewer draws on the large vocabulary (memory), so a wider band there (about 2.7 and 3.4 standard errors at p = .5)
    check_draws(scores, temperature, top_p, *((2000, 0.03) if vocab == 50 else (600, 0.07)))


def test_draw_with_top_p_one_samples_the_whole_softmax():
    scores = toy_logits(50, peaked=2, flat=2)
    assert (nucleus_probs(scores, 1.3, 1.0) > 0).all()
    check_draws(scores, 1.3, 1.0, n=3000)


def test_inverse_cdf_draw_never_picks_a_zero_weight_and_matches_the_weights(monkeypatch):
    from align.generation.hf import draw

    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    n = 8000
    drawn = draw(weights.repeat_interleave(n, dim=0)).view(2, n)
    assert (weights.gather(1, drawn) > 0).all()
    freq = torch.zeros_like(weights).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=weights.dtype)) / n
    torch.testing.assert_close(freq, weights / weights.sum(-1, keepdim=True), atol=0.02, rtol=0)
    # Uniform draws of exactly 0 and just under 1 land on the first and last tokens with weight, not their zeros.
    for u, want in ((0.0, [1, 0]), (1 - 2**-24, [5, 6])):
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u, **kw))
        assert draw(weights).tolist() == want


PROMPTS = [[{"role": "user", "content": "hi"}],
           [{"role": "user", "content": "Name three colours and say which one you like best, please."}],
           [{"role": "user", "content": "What colour is the sky?"}]]


def test_hf_sampler_greedy_is_plain_greedy_generate(tiny_model, one_thread):
    from transformers import AutoModelForCausalLM

    from align.generation import SamplingSettings
    from align.generation.hf import HFSampler, chat_prompt_ids
    from align.models.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    sampler = HFSampler(model, tok)
    got = sampler.generate(PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=8, batch_size=3))

    batch = [chat_prompt_ids(tok, p) for p in PROMPTS]
    width = max(len(ids) for ids in batch)
    assert len({len(ids) for ids in batch}) == 3  # real left padding
    pad = tok.pad_token_id
    out = model.generate(input_ids=torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch]),
                         attention_mask=torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch]),
                         max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=list(sampler.eos_ids))
    for (sample,), ids, row in zip(got, batch, out[:, width:].tolist()):
        cut = next((i + 1 for i, t in enumerate(row) if t in sampler.eos_ids), len(row))
        assert sample.prompt_ids == ids and sample.response_ids == row[:cut]


def test_hf_sampler_seed_decides_the_samples(tiny_model, one_thread):
    from transformers import AutoModelForCausalLM

    from align.generation import SamplingSettings
    from align.generation.hf import HFSampler
    from align.models.load import load_tokenizer

    sampler = HFSampler(AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(tiny_model))

    def draw(seed: int) -> list[list[int]]:
        params = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=6, batch_size=3, seed=seed)
        return [s.response_ids for (s,) in sampler.generate(PROMPTS, params)]

    first = draw(0)
    assert all(len(r) > 0 for r in first)
    assert draw(0) == first
    assert draw(1) != first


# ---------------------------------------------------------------- DPO reference (align/stages/dpo.py)


def completion_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])  # the adapter methods DPO accepts (qlora: 4-bit lora)
def test_fast_reference_is_trls_ref_adapter_and_keeps_the_policy_trainable(tiny_model, one_thread, method):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import use_adapter

    from align.models.peft import PeftSettings, attach_peft
    from align.stages.dpo import fast_reference

    model, _ = attach_peft(AutoModelForCausalLM.from_pretrained(tiny_model), PeftSettings(method=method, r=4, alpha=8))
    # What DPOTrainer does with a PeftModel and no ref_model: a frozen copy of the adapter under "ref".
    model.add_adapter("ref", model.peft_config["default"])
    for name, p in model.named_parameters():  # (IA3's names end in ".default", TRL matches only ".default.")
        parts = name.split(".")
        if "default" in parts:
            ref = ".".join("ref" if x == "default" else x for x in parts)
            model.get_parameter(ref).data.copy_(p.data)
    model.eval()
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(4))
    with use_adapter(model, "ref"):
        with_ref = completion_logprobs(model, ids)
    with use_adapter(model, None):
        disabled = completion_logprobs(model, ids)
    torch.testing.assert_close(disabled, with_ref, atol=1e-6, rtol=0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fast_reference(SimpleNamespace(model=model))
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    names = [n.split(".") for n, _ in model.named_parameters()]
    assert not any("ref" in n for n in names) and any("default" in n for n in names)
    assert trainable and {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all("default" in n.split(".") for n in trainable)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


def test_fast_reference_leaves_models_without_a_ref_adapter(tiny_model):
    from transformers import AutoModelForCausalLM

    from align.stages.dpo import fast_reference

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fast_reference(SimpleNamespace(model=model))  # a full-weight policy (its reference is a frozen copy)
    assert not hasattr(model, "peft_config") or not model.peft_config


# ---------------------------------------------------------------- contiguous LM-head input (align/models/lm_head.py)


def test_loaded_models_project_a_sliced_head_input_with_one_matmul(tiny_model):
    """Without the hook a no-grad, frozen pass with `logits_to_keep` projects the strided slice as a batched matmul
    over a per-row copy of the [V, H] head; with it, as one matmul. The logits are the same."""
    from torch.profiler import profile

    from align.models.load import load_model

    model = load_model(tiny_model, dtype="bfloat16").eval().requires_grad_(False)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))

    def head_ops() -> tuple[torch.Tensor, int]:
        with torch.no_grad(), profile() as prof:
            logits = model(input_ids=ids, logits_to_keep=5, use_cache=False).logits
        return logits, sum(e.count for e in prof.key_averages() if e.key == "aten::bmm")

    fast, bmm_with_hook = head_ops()
    model.get_output_embeddings()._forward_pre_hooks.clear()
    slow, bmm_without = head_ops()
    assert bmm_with_hook < bmm_without
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_trainer_kwargs_name_only_fields_the_installed_transformers_has(monkeypatch, tmp_path):
    """transformers renamed gradient_checkpointing to activation_checkpointing; a release before the rename
    (5.17, on a GPU image) raised TypeError on the new name in every Trainer stage."""
    from transformers import TrainingArguments

    from align import training

    settings = training.TrainSettings(gradient_checkpointing=True)
    kwargs = training.trainer_kwargs(settings, tmp_path, seed=0, has_eval=False)
    assert set(kwargs) <= set(TrainingArguments.__dataclass_fields__)
    before_rename = {k: v for k, v in TrainingArguments.__dataclass_fields__.items() if k != "activation_checkpointing"}
    monkeypatch.setattr(TrainingArguments, "__dataclass_fields__", before_rename)
    kwargs = training.trainer_kwargs(settings, tmp_path, seed=0, has_eval=False)
    assert kwargs["gradient_checkpointing"] is True and "activation_checkpointing" not in kwargs
