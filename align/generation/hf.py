"""transformers `generate` backend: batched, left padding, KV cache. Works with a live (PEFT) model object.

Sampling is ours, not `generate`'s: its top-p warper sorts the whole vocabulary and its draw runs `multinomial`
over the whole vocabulary, every step — on a CPU with the default model's 49k vocabulary that was ~44 ms of a
~125 ms decoding step at batch 16. `draw_tokens` takes the same nucleus (the same rule as transformers'
TopPLogitsWarper) from the top candidates only and draws among them by inverse CDF (`draw`); `generate` runs
greedy on the one-hot result.
Same distribution, not the same random stream: samples differ from `do_sample=True` ones for the same seed.

Decoding is ours too where the model allows it (`decode`): `generate` keeps every row of a batch in every step
until the longest one ends, so a batch whose answers end at 20 and at 80 tokens computes 80 steps for all of them;
`decode` drops a row from the batch and from the KV cache as soon as it ends, and computes the LM head over the
prompt's last position only. Greedy rows are the same tokens as `generate`'s; sampled rows with per-row seeds are
the same tokens as when nothing was dropped (each row draws from its own stream).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList

from align.data.records import Message
from align.generation import Sample, SamplingSettings
from align.models.load import chat_ids

CANDIDATES = 1024  # tokens ranked before the nucleus cut; the full vocabulary is sorted only if their mass < top_p


def draw(weights: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One index per row of `weights` [B, N] (non-negative, unnormalised), drawn with probability proportional to
    its weight: the first index whose cumulative weight exceeds a uniform draw on [0, total). Same distribution
    as `torch.multinomial(weights, 1)`, which took 6 ms per call over the 49k vocabulary here against 0.2 ms.
    generators: one per row, so a row's draws do not depend on which rows share its batch."""
    cumulative = weights.cumsum(-1)
    if generators is None:
        u = torch.rand(weights.shape[0], 1, device=weights.device)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=weights.device) for g in generators])
    u = u * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u, right=True)[:, 0].clamp(max=weights.shape[-1] - 1)


def draw_tokens(scores: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row of `scores` [B, V], drawn from softmax(scores / temperature) cut to the top-p nucleus:
    a token is kept while the mass of the tokens ranked above it is below `top_p` (the most likely always is)."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return draw(probs, generators)
    top, idx = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):  # a flat distribution: the nucleus is wider than the candidates
        top, idx = probs.sort(dim=-1, descending=True)
    top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    return idx.gather(-1, draw(top, generators)[:, None])[:, 0]


def token_logprobs(scores: torch.Tensor, token: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log-prob [B] of `token` [B] under the distribution `draw_tokens` samples from: softmax(scores / temperature),
    renormalised over the top-p nucleus when top_p < 1 (what vLLM reports as processed_logprobs)."""
    logp = torch.log_softmax(scores.float() / temperature, dim=-1)
    out = logp.gather(-1, token[:, None])[:, 0]
    if top_p < 1.0:
        probs = logp.exp().sort(dim=-1, descending=True).values
        kept = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0).sum(-1)
        out = out - kept.log()
    return out


def nucleus_processor(temperature: float, top_p: float, record: list[torch.Tensor] | None = None,
                      generators: list[torch.Generator] | None = None) -> Any:
    """A logits processor for greedy `generate`: the drawn token gets 0, every other -inf. `record`: append each
    step's log-probs [B] of the drawn tokens (`token_logprobs`), computed from the same scores. generators: one
    random stream per row (`draw`)."""

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = draw_tokens(scores, temperature, top_p, generators)
        if record is not None:
            record.append(token_logprobs(scores, token, temperature, top_p))
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    return process


def chat_prompt_ids(tokenizer: Any, prompt: list[Message]) -> list[int]:
    """The prompt's ids with the assistant turn opened (what a sampler continues)."""
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def can_drop_rows(model: Any) -> bool:
    """Can `decode` run this model: a causal LM (or a PEFT model of one) whose cache is transformers' dynamic cache.
    Prompt learning (prefix/prompt tuning: PEFT feeds its own virtual tokens) and X-LoRA (a scaling pass of its own
    per forward) decode through `generate`."""
    config = getattr(model, "peft_config", None)
    if config is not None:
        active = config.get(getattr(model, "active_adapter", "default"))
        if active is None or active.is_prompt_learning or type(active).__name__.startswith("XLora"):
            return False
    return not getattr(model.config, "is_encoder_decoder", False)


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` where transformers renamed it (5.2x; the old name
    warns there and goes in 5.40), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def decode(model: Any, input_ids: torch.Tensor, attention: torch.Tensor, params: SamplingSettings,
           generators: list[torch.Generator] | None, eos_ids: set[int], *,
           logprobs: bool = False) -> tuple[list[list[int]], list[list[float]] | None]:
    """New tokens per row of a left-padded batch (and, with `logprobs`, each drawn token's log-prob, as
    `nucleus_processor` records them): greedy at temperature 0, else `draw_tokens`. A row leaves the batch (and
    its keys/values the cache) at its first EOS token; the loop ends when no row is left or after
    `params.max_new_tokens` tokens."""
    from transformers import DynamicCache

    live = torch.arange(input_ids.shape[0], device=input_ids.device)  # batch row -> original row
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    scores_out: list[list[float]] | None = [[] for _ in range(input_ids.shape[0])] if logprobs else None
    position = (attention.long().cumsum(-1) - 1).clamp(min=0)
    cache = {cache_argument(model): DynamicCache(config=model.config)}  # the same object every step, filled in place
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=True,
                   logits_to_keep=1, **cache).logits[:, -1]
    position = position[:, -1:]
    for step in range(params.max_new_tokens):
        if params.temperature > 0:
            rows_generators = None if generators is None else [generators[i] for i in live.tolist()]
            token = draw_tokens(logits, params.temperature, params.top_p, rows_generators)
        else:
            token = logits.argmax(-1)
        chosen = token.tolist()
        drawn = token_logprobs(logits, token, params.temperature, params.top_p).tolist() if logprobs else None
        for j, row in enumerate(live.tolist()):
            tokens[row].append(chosen[j])
            if scores_out is not None and drawn is not None:
                scores_out[row].append(drawn[j])
        going = torch.tensor([t not in eos_ids for t in chosen], device=token.device)
        if step == params.max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero()[:, 0]
            live, token, attention, position = live[keep], token[keep], attention[keep], position[keep]
            for layer in next(iter(cache.values())).layers:
                layer.batch_select_indices(keep)
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=-1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position, use_cache=True,
                       **cache).logits[:, -1]
    return tokens, scores_out


class HFSampler:
    """Sampler over a live (PEFT) model. logprobs: fill Sample.logprobs with the log-prob of each sampled token
    under the distribution it was drawn from (the sampling model's own, in its dtype), as VLLMSampler does; PPO
    compares them with the trainer's (the off-policy gap of a rollout copy in another dtype)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, logprobs: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.return_logprobs = logprobs
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    @torch.no_grad()
    def generate(self, prompts: list[list[Message]], params: SamplingSettings, n: int = 1,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        """seeds: one per prompt, each drawing from its own random stream, so a prompt's samples do not depend on
        the other prompts of the call (PPO: the same rollouts however the prompts are split over processes)."""
        flat = [p for p in prompts for _ in range(n)]
        row_seeds = [seed * 1009 + j for seed in seeds for j in range(n)] if seeds is not None else None
        samples: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(flat), params.batch_size):
            batch = [chat_prompt_ids(self.tokenizer, p) for p in flat[start:start + params.batch_size]]
            width = max(len(ids) for ids in batch)
            # Left padding: every prompt ends at the same column, so new tokens line up.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            torch.manual_seed(params.seed + start)
            generators = None if row_seeds is None else [
                torch.Generator(device=device).manual_seed(s) for s in row_seeds[start:start + params.batch_size]]
            record: list[torch.Tensor] | None = [] if self.return_logprobs and params.temperature > 0 else None
            sample = ([nucleus_processor(params.temperature, params.top_p, record, generators)]
                      if params.temperature > 0 else [])
            if can_drop_rows(self.model):
                rows, steps = decode(self.model, input_ids, attention, params, generators, self.eos_ids,
                                     logprobs=record is not None)
            else:
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=params.max_new_tokens,
                    do_sample=False, logits_processor=LogitsProcessorList(sample), pad_token_id=pad_id,
                    eos_token_id=list(self.eos_ids), use_cache=True)
                rows = out[:, width:].tolist()
                steps = torch.stack(record, dim=1).tolist() if record else None  # [rows, new tokens]
            for k, (ids, row) in enumerate(zip(batch, rows)):
                cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                response = row if cut is None else row[: cut + 1]
                text = self.tokenizer.decode(response, skip_special_tokens=True).strip()
                logprobs = steps[k][: len(response)] if steps is not None else None
                samples.append(Sample(text=text, prompt_ids=ids, response_ids=response, finished=cut is not None,
                                      logprobs=logprobs))
        self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
