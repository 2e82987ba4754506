"""vLLM backend (GPU). `vllm` is imported only when a VLLMSampler is built, so CPU installs never need it.

A LoRA adapter is not merged: the base model is loaded with `enable_lora` and every request carries a
LoRARequest, which is how vLLM serves adapters (and lets one engine serve several).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.data.records import Message
from align.errors import ModelError
from align.generation import Sample, SamplingSettings
from align.generation.hf import chat_prompt_ids


def vllm_available() -> bool:
    """True when vllm is importable and a CUDA device is present (what vLLM needs here)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def adapter_rank(adapter_dir: Path) -> int:
    import json

    data = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if data.get("peft_type") not in ("LORA", None) or data.get("use_dora"):
        raise ModelError(f"{adapter_dir} is a {data.get('peft_type')}{' (DoRA)' if data.get('use_dora') else ''} "
                         f"adapter; vLLM serves plain LoRA adapters only. Merge it first: "
                         f"align merge adapter={adapter_dir}, then pass the merged run folder as model=")
    return int(data.get("r", 16))


class VLLMSampler:
    """Sampler on a vLLM engine. `adapter` (a LoRA folder) is applied per request on top of `base`."""

    name = "vllm"

    def __init__(self, base: Path, tokenizer: Any, *, adapter: Path | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.85, max_model_len: int = 2048,
                 trust_remote_code: bool = False) -> None:
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ModelError(f"backend=vllm needs the vllm package ({e}); install it with "
                             f"pip install -e '.[vllm]' on a CUDA machine, or use backend=hf") from None
        self.tokenizer = tokenizer
        lora_kwargs: dict[str, Any] = {}
        self.lora_request = None
        if adapter is not None:
            rank = adapter_rank(adapter)
            # vLLM rounds max_lora_rank up to one of its supported sizes; 8..256 covers what we train.
            lora_kwargs = {"enable_lora": True, "max_lora_rank": max(8, 1 << (rank - 1).bit_length()), "max_loras": 1}
            self.lora_request = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        self.llm = LLM(model=str(base), tokenizer=str(base), tensor_parallel_size=tensor_parallel_size,
                       dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype),
                       gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, trust_remote_code=trust_remote_code, **lora_kwargs)

    def generate(self, prompts: list[list[Message]], params: SamplingSettings, n: int = 1) -> list[list[Sample]]:
        from vllm import SamplingParams

        ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        greedy = params.temperature <= 0
        sp = SamplingParams(n=n, temperature=0.0 if greedy else params.temperature,
                            top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
                            seed=params.seed, skip_special_tokens=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False,
                                 lora_request=self.lora_request)
        return [[Sample(text=o.text.strip(), prompt_ids=p, response_ids=list(o.token_ids),
                        finished=o.finish_reason == "stop") for o in out.outputs]
                for p, out in zip(ids, outs)]
