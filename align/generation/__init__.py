"""Sampling from a policy: one Sampler interface, a transformers backend (CPU/GPU) and a vLLM backend (GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from align.config import opt
from align.data.records import Message


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = opt(0.8, "softmax temperature (0: greedy)", ge=0.0, le=10.0)
    top_p: float = opt(0.95, "nucleus sampling mass", gt=0.0, le=1.0)
    max_new_tokens: int = opt(96, "longest response in tokens", ge=1)
    seed: int = opt(0, "sampling seed (the same seed gives the same samples on the same backend)", ge=0)
    batch_size: int = opt(8, "prompts per generate call (hf backend)", ge=1)


@dataclass
class Sample:
    """One completion. `finished` is False when it hit max_new_tokens without an end-of-sequence token."""

    text: str
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, including the EOS token when finished
    finished: bool
    logprobs: list[float] | None = None  # sampler's log-prob of each response token, when asked for


class Sampler(Protocol):
    name: str

    def generate(self, prompts: list[list[Message]], params: SamplingSettings, n: int = 1,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        """`n` samples for each prompt (prompts are chat messages; the chat template is applied). seeds: one per
        prompt, each sampled from its own random stream (the samples then do not depend on the batch)."""
        ...
