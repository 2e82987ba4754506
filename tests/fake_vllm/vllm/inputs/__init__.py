"""Prompt schemas. Source: `TokensPrompt` in vllm/inputs/data.py (0.10.0) and vllm/inputs/llm.py (0.33.0); both
versions re-export it as `vllm.inputs.TokensPrompt` and `vllm.TokensPrompt`."""

from typing import TypedDict


class TokensPrompt(TypedDict):
    """A tokenized prompt (a plain dict at runtime, as in vLLM)."""

    prompt_token_ids: list[int]


# Keys a TokensPrompt may carry in both 0.10.0 and 0.33.0 (`prompt` is 0.33-only, so it is refused here).
TOKENS_PROMPT_KEYS = frozenset({"prompt_token_ids", "token_type_ids", "multi_modal_data", "mm_processor_kwargs",
                                "cache_salt"})
