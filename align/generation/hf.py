"""transformers `generate` backend: batched, left padding, KV cache. Works with a live (PEFT) model object.

Sampling is ours, not `generate`'s: its top-p warper sorts the whole vocabulary and its draw runs `multinomial`
over the whole vocabulary, every step — on a CPU with the default model's 49k vocabulary that was ~44 ms of a
~125 ms decoding step at batch 16. `draw_tokens` takes the same nucleus (the same rule as transformers'
TopPLogitsWarper) from the top candidates only and draws among them by inverse CDF (`draw`); `generate` runs
greedy on the one-hot result.
Same distribution, not the same random stream: samples differ from `do_sample=True` ones for the same seed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList

from align.data.records import Message
from align.generation import Sample, SamplingSettings
from align.models.load import chat_ids

CANDIDATES = 1024  # tokens ranked before the nucleus cut; the full vocabulary is sorted only if their mass < top_p


def draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` [B, N] (non-negative, unnormalised), drawn with probability proportional to
    its weight: the first index whose cumulative weight exceeds a uniform draw on [0, total). Same distribution
    as `torch.multinomial(weights, 1)`, which took 6 ms per call over the 49k vocabulary here against 0.2 ms."""
    cumulative = weights.cumsum(-1)
    u = torch.rand(weights.shape[0], 1, device=weights.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u, right=True)[:, 0].clamp(max=weights.shape[-1] - 1)


def draw_tokens(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of `scores` [B, V], drawn from softmax(scores / temperature) cut to the top-p nucleus:
    a token is kept while the mass of the tokens ranked above it is below `top_p` (the most likely always is)."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return draw(probs)
    top, idx = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):  # a flat distribution: the nucleus is wider than the candidates
        top, idx = probs.sort(dim=-1, descending=True)
    top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    return idx.gather(-1, draw(top)[:, None])[:, 0]


def nucleus_processor(temperature: float, top_p: float) -> Any:
    """A logits processor for greedy `generate`: the drawn token gets 0, every other -inf."""

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = draw_tokens(scores, temperature, top_p)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    return process


def chat_prompt_ids(tokenizer: Any, prompt: list[Message]) -> list[int]:
    """The prompt's ids with the assistant turn opened (what a sampler continues)."""
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


class HFSampler:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    @torch.no_grad()
    def generate(self, prompts: list[list[Message]], params: SamplingSettings, n: int = 1) -> list[list[Sample]]:
        flat = [p for p in prompts for _ in range(n)]
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
            sample = [nucleus_processor(params.temperature, params.top_p)] if params.temperature > 0 else []
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=params.max_new_tokens,
                do_sample=False, logits_processor=LogitsProcessorList(sample), pad_token_id=pad_id,
                eos_token_id=list(self.eos_ids), use_cache=True)
            for ids, row in zip(batch, out[:, width:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                response = row if cut is None else row[: cut + 1]
                text = self.tokenizer.decode(response, skip_special_tokens=True).strip()
                samples.append(Sample(text=text, prompt_ids=ids, response_ids=response, finished=cut is not None))
        self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
