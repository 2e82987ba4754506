"""Pick a backend (`auto` | `hf` | `vllm`) and build a Sampler from a model name, folder, adapter or run folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import DTYPE_HELP, Dtype, opt
from align.errors import ConfigError
from align.generation import Sampler
from align.models.load import (
    base_of_adapter,
    cache_root,
    is_adapter,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve_model,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class BackendSettings:
    backend: Literal["auto", "hf", "vllm"] = opt("auto", "auto (vLLM when importable and a GPU is present, else hf)"
                                                         " | hf | vllm")
    dtype: Dtype = opt("auto", DTYPE_HELP)
    tensor_parallel_size: int = opt(1, "vllm: GPUs to shard the model over", ge=1)
    gpu_memory_utilization: float = opt(0.85, "vllm: share of the WHOLE GPU's memory the engine takes (weights + KV "
                                              "cache; it refuses to start when less is free)", gt=0.0, le=1.0)
    max_model_len: int = opt(2048, "vllm: longest prompt + response in tokens", ge=16)
    sleep: bool = opt(False, "vllm: start with sleep mode and free the engine's memory (weights to CPU, KV cache "
                             "dropped) between rollouts while the policy trains (ppo; vLLM >= 0.10, CUDA only)")
    trust_remote_code: bool = opt(False, "allow model code from the model folder")


# An engine beside a policy in training (PPO): TRL's colocate default share (GRPOConfig.vllm_gpu_memory_utilization).
COLOCATED = BackendSettings(gpu_memory_utilization=0.3)


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
        log.info(f"generation backend: {backend}{why}; model {path}")
    tokenizer = load_tokenizer(path, settings.trust_remote_code)
    if backend == "vllm":
        base, adapter = servable(path, serve_dtype(settings.dtype), settings.trust_remote_code)
        return vllm_sampler(base, tokenizer, settings, adapter=adapter)
    import torch

    from align.generation.hf import HFSampler
    from align.models.prepacked import prepack_for_sampling

    dtype = str(pick_dtype(settings.dtype, use="decode")).removeprefix("torch.")  # auto: what samples faster here
    hf_model = load_model(path, dtype=dtype, trust_remote_code=settings.trust_remote_code, merge=True)
    if torch.cuda.is_available():
        hf_model = hf_model.to("cuda")
    return HFSampler(prepack_for_sampling(hf_model), tokenizer)


def vllm_sampler(base: Path, tokenizer: Any, settings: BackendSettings, **kwargs: Any) -> Any:
    """A VLLMSampler over `base` with the engine settings of `settings`; `kwargs` go to VLLMSampler (adapter=,
    lora_rank= to swap adapters later with set_adapter, logprobs=True for the sampler's log-probs). The engine is
    always told its dtype (`serve_dtype`), never left to guess from the folder."""
    from align.generation.vllm import VLLMSampler

    return VLLMSampler(base, tokenizer, tensor_parallel_size=settings.tensor_parallel_size,
                       dtype=serve_dtype(settings.dtype, base), gpu_memory_utilization=settings.gpu_memory_utilization,
                       max_model_len=settings.max_model_len, trust_remote_code=settings.trust_remote_code,
                       sleep_mode=settings.sleep, **kwargs)


def serve_dtype(name: str, model_dir: Path | None = None) -> str:
    """The dtype a vLLM engine serves in, stated explicitly: `name` when given; for 'auto', the dtype the model folder
    was saved in when it is a 16-bit one, else bf16 (fp16 on a GPU without bf16). vLLM's own 'auto' would serve a
    float32 folder in fp16 (<= 0.10) or the platform's 16-bit type (later): never what was trained or saved."""
    import json

    from align.generation.vllm import DTYPES

    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text())
        saved = config.get("torch_dtype") or config.get("dtype")
        if saved in ("bfloat16", "float16"):
            return saved
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def servable(path: Path, dtype: str, trust_remote_code: bool = False) -> tuple[Path, Path | None]:
    """(a model folder vLLM can load as its base, the LoRA adapter to send with every request or None) for a model
    or adapter folder. vLLM's base must be a plain model folder (config.json + weights) and it serves plain LoRA
    adapters only, so a stacked chain (SFT adapter -> DPO adapter -> online adapter) is served as its top LoRA on
    the merge of everything below it, and a top adapter vLLM cannot serve (DoRA, IA3, ...) is merged in too."""
    from align.generation.vllm import is_plain_lora

    path = Path(path)
    if not is_adapter(path):
        return path, None
    if not is_plain_lora(path):
        return merged_model(path, dtype, trust_remote_code), None
    base = base_of_adapter(path)
    return (merged_model(base, dtype, trust_remote_code) if is_adapter(base) else base), path


def merged_model(adapter: Path, dtype: str, trust_remote_code: bool = False) -> Path:
    """The adapter chain ending in `adapter` merged into one plain model folder, saved in `dtype` (config.json says
    so), under ALIGN_CACHE/merged/<key>. The merge itself is `load_model`'s (exact, in float32); only the result is
    cast. The key covers every adapter of the chain (path, weights' size and mtime) and the dtype, so a retrained
    adapter gets a new folder. Written to a temporary folder and renamed, so a half-written merge is never used."""
    import hashlib
    import os
    import shutil

    import torch

    chain, link = [], Path(adapter).resolve()
    while is_adapter(link):
        chain.append(link)
        link = base_of_adapter(link).resolve()
    stamp = [(str(a), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(a.glob("*.safetensors"))])
             for a in chain] + [str(link), dtype]
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]
    target = cache_root() / "merged" / f"{Path(adapter).name}-{dtype}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info(f"vllm: merging the adapter chain {' -> '.join(str(a) for a in reversed(chain))} into {target} "
             f"({dtype})")
    model = load_model(Path(adapter), dtype="float32", merge=True, trust_remote_code=trust_remote_code)
    model = model.to(getattr(torch, dtype))
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(Path(adapter), trust_remote_code).save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target
