"""transformers `generate` backend: batched, left padding, KV cache. Works with a live (PEFT) model object."""

from __future__ import annotations

from typing import Any

import torch

from align.data.records import Message
from align.generation import Sample, SamplingSettings
from align.models.load import chat_ids


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
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=params.max_new_tokens,
                do_sample=params.temperature > 0, temperature=params.temperature if params.temperature > 0 else None,
                top_p=params.top_p if params.temperature > 0 else None, top_k=0 if params.temperature > 0 else None,
                pad_token_id=pad_id, eos_token_id=list(self.eos_ids), use_cache=True)
            for ids, row in zip(batch, out[:, width:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                response = row if cut is None else row[: cut + 1]
                text = self.tokenizer.decode(response, skip_special_tokens=True).strip()
                samples.append(Sample(text=text, prompt_ids=ids, response_ids=response, finished=cut is not None))
        self.model.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
