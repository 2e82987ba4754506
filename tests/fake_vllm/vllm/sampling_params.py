"""SamplingParams. Source: vllm/sampling_params.py, 0.10.0 and 0.33.0 (a msgspec.Struct; unknown keyword
arguments raise TypeError "Unexpected keyword argument"; values are checked in __post_init__ / _verify_args).

Accepted fields are those present in every version in range (`best_of` is 0.10-only, `flat_logprobs` and
`structured_outputs` are newer: all refused). Checks mirrored:
- temperature in [0, 2] (the upper bound is 0.25.0+; mirrored because it is the strictest), 0 < t < 0.01 is
  raised to 0.01 (_MAX_TEMP);
- greedy (temperature < 1e-5) forces top_p=1, top_k=0, min_p=0 and refuses n > 1 (_verify_greedy_sampling,
  every version);
- n >= 1, top_p in (0, 1], max_tokens >= 1, logprobs >= 0 (0.33.0 also allows -1), seed -1 -> None.
Stricter than vLLM: keyword-only, and the fields align sets are type-checked.
"""

from __future__ import annotations

from typing import Any

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2

_DEFAULTS: dict[str, Any] = {
    "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0,
    "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None, "stop_token_ids": None,
    "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
    "detokenize": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "logit_bias": None, "allowed_token_ids": None, "extra_args": None,
    "bad_words": None,
}
# (types allowed) for the fields align sets; None allowed where vLLM's annotation is Optional.
_TYPES: dict[str, tuple[type, ...]] = {
    "n": (int,), "temperature": (float, int), "top_p": (float, int), "max_tokens": (int, type(None)),
    "seed": (int, type(None)), "skip_special_tokens": (bool,), "logprobs": (int, type(None)),
}


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in _DEFAULTS:
                raise TypeError(f"Unexpected keyword argument '{key}'")
        for key, value in {**_DEFAULTS, **kwargs}.items():
            if key in _TYPES and (not isinstance(value, _TYPES[key]) or
                                  (isinstance(value, bool) and bool not in _TYPES[key])):
                raise TypeError(f"SamplingParams.{key} must be {' | '.join(t.__name__ for t in _TYPES[key])}, "
                                f"got {type(value).__name__}")
            setattr(self, key, value)
        self._post_init()

    def _post_init(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        self.stop_token_ids = self.stop_token_ids or []
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify_args(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")

    def __repr__(self) -> str:
        return "SamplingParams(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in _DEFAULTS) + ")"
