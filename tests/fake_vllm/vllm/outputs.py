"""Results of LLM.generate. Source: vllm/outputs.py, 0.10.0 and 0.33.0.

CompletionOutput (a dataclass in both): index, text, token_ids, cumulative_logprob, logprobs, finish_reason,
stop_reason, lora_request (0.15+ add routed_experts, 0.30+ sampling_mask and more, all defaulted).
`token_ids` includes the EOS token when the completion stopped on it, while `text` leaves it out
(v1/engine/detokenizer.py: a stop-terminated sequence's last token is not detokenized).
`finish_reason` is "stop" (EOS, stop token or stop string) or "length" (max_tokens or max_model_len).
`logprobs`: per generated token a dict {token_id: Logprob}, holding the sampled token plus the top `logprobs`
(vllm/sequence.py in 0.10.0, vllm/logprobs.py in 0.33.0).

RequestOutput.__init__(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished, metrics=None,
lora_request=None, ...) in both versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool, metrics: Any = None,
                 lora_request: Any = None, **kwargs: Any) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request
