"""Pick a backend (`auto` | `hf` | `vllm`) and build a Sampler from a model name, folder, adapter or run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import DTYPE_HELP, Dtype, opt
from align.errors import ConfigError
from align.generation import Sampler
from align.models.load import (
    base_of_adapter,
    is_adapter,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve_model,
)

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class BackendSettings:
    backend: Literal["auto", "hf", "vllm"] = opt("auto", "auto (vLLM when importable and a GPU is present, else hf)"
                                                         " | hf | vllm")
    dtype: Dtype = opt("auto", DTYPE_HELP)
    tensor_parallel_size: int = opt(1, "vllm: GPUs to shard the model over", ge=1)
    gpu_memory_utilization: float = opt(0.85, "vllm: fraction of GPU memory the engine may take", gt=0.0, le=1.0)
    max_model_len: int = opt(2048, "vllm: longest prompt + response in tokens", ge=16)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")


def choose_backend(backend: str) -> str:
    """'auto' -> 'vllm' when vllm imports and CUDA is present, else 'hf'. Explicit names are checked."""
    from align.generation.vllm import vllm_available

    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return backend


def build_sampler(model: str | Path, settings: BackendSettings = BackendSettings(), *, verbose: bool = True) -> Sampler:
    """A Sampler over `model` ('default', a model/adapter folder, or a stage run folder) on the chosen backend.

    hf merges a LoRA-family adapter into its base; vllm keeps it separate and sends it as a LoRA request.
    """
    path = resolve_model(model)
    backend = choose_backend(settings.backend)
    if verbose:
        why = " (auto: vllm + CUDA found)" if settings.backend == "auto" and backend == "vllm" else (
            " (auto: no vllm or no GPU)" if settings.backend == "auto" else "")
        print(f"generation backend: {backend}{why}; model {path}", flush=True)
    tokenizer = load_tokenizer(path, settings.trust_remote_code)
    if backend == "vllm":
        adapter = path if is_adapter(path) else None
        return vllm_sampler(base_of_adapter(path) if adapter else path, tokenizer, settings, adapter=adapter)
    import torch

    from align.generation.hf import HFSampler

    dtype = str(pick_dtype(settings.dtype, use="decode")).removeprefix("torch.")  # auto: what samples faster here
    hf_model = load_model(path, dtype=dtype, trust_remote_code=settings.trust_remote_code, merge=True)
    if torch.cuda.is_available():
        hf_model = hf_model.to("cuda")
    return HFSampler(hf_model, tokenizer)


def vllm_sampler(base: Path, tokenizer: Any, settings: BackendSettings, **kwargs: Any) -> Any:
    """A VLLMSampler over `base` with the engine settings of `settings`; `kwargs` go to VLLMSampler (adapter=,
    lora_rank= to swap adapters later with set_adapter, logprobs=True for the sampler's log-probs)."""
    from align.generation.vllm import VLLMSampler

    return VLLMSampler(base, tokenizer, tensor_parallel_size=settings.tensor_parallel_size, dtype=settings.dtype,
                       gpu_memory_utilization=settings.gpu_memory_utilization,
                       max_model_len=settings.max_model_len, trust_remote_code=settings.trust_remote_code, **kwargs)
