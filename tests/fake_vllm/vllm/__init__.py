"""A fake `vllm` for CPU tests: the classes, arguments and result fields align uses, checked like the real ones.

Mirrored from the vLLM wheels 0.10.0 and 0.33.0 (the ends of pyproject's `[vllm]` range, vllm>=0.10,<0.34),
cross-checked against 0.10.2, 0.15.0-0.20.0, 0.25.0 and 0.30.0. Where versions differ the fake accepts only what
ALL of them accept (an argument added in 0.16 is refused here), so code that passes these tests runs on every
version in the range. Each signature names the file and versions it comes from.

Not mirrored (align does not use them): chat(), beam search, pooling, multimodal inputs.
Stricter than vLLM on purpose: keyword-only SamplingParams, type checks on the fields align sets, and
assertions for two silent vLLM pitfalls (a reused LoRA id, a stale prefix cache after a weight reload).

Generation is deterministic and model-free: a few word tokens of the real tokenizer (the `tokenizer=` folder),
picked by a hash of (prompt, seed, sample index, LoRA id, weights version), then EOS.
"""

from vllm.entrypoints.llm import LLM
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "0.33.0"  # the newest version mirrored; tests monkeypatch it to exercise version checks

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "TokensPrompt", "__version__"]
