"""vLLM backend (GPU). `vllm` is imported only when a VLLMSampler is built, so CPU installs never need it.

Written against vLLM 0.10-0.33 (pyproject's `[vllm]` extra) and tested on CPU against tests/fake_vllm, which
mirrors the vLLM API used here. A LoRA adapter is not merged: the engine starts with `enable_lora` and every
request carries a LoRARequest, which is how vLLM serves adapters. To hand an updated adapter to a running engine
(PPO / online rollouts), `set_adapter(folder)` registers it as a NEW LoRARequest: vLLM caches adapters by id, so
re-sending the old id would keep serving the old weights. Full fine-tuning: `load_weights(folder)` reloads the
engine's weights in place through vLLM's `collective_rpc("reload_weights")`.
Memory: the engine takes `gpu_memory_utilization` of the whole GPU; with `sleep_mode` it is started with
enable_sleep_mode and `sleep()` frees its share (level 1: weights to CPU, KV cache dropped) until the next
generate wakes it; `close()` shuts it down and frees its memory (between pipeline/online stages).
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any

from align.data.records import Message
from align.errors import ConfigError, DataError, ModelError
from align.generation import Sample, SamplingSettings
from align.generation.hf import chat_prompt_ids

log = logging.getLogger(__name__)

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values every vLLM in range accepts
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
MAX_TEMPERATURE = 2.0  # vLLM >= 0.25 refuses temperature > 2
RELOAD_WITH_PATH = (0, 16)  # reload_weights(weights_path=...) exists from vLLM 0.16


_OPEN: weakref.WeakSet[VLLMSampler] = weakref.WeakSet()  # engines alive and not closed yet (see close_engines)
_STARTED: list[dict[str, Any]] = []  # what each engine started since the last close_engines was given


def close_engines() -> list[dict[str, Any]]:
    """Shut down every engine this process started that is still alive and not closed (a stage that ended without
    closing its sampler, e.g. `align generate` inside `align online`), so the next stage gets the GPU back. Returns
    what each engine started since the last call was given (`describe`), for the manifest."""
    for sampler in list(_OPEN):
        sampler.close()
    started = list(_STARTED)
    _STARTED.clear()
    return started


def vllm_available() -> bool:
    """True when vllm is importable and a CUDA device is present (what vLLM needs here)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def is_plain_lora(adapter_dir: Path) -> bool:
    """A LoRA adapter vLLM can serve as a LoRARequest (not DoRA, not another PEFT type)."""
    data = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return data.get("peft_type") in ("LORA", None) and not data.get("use_dora")


def adapter_rank(adapter_dir: Path) -> int:
    data = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if data.get("peft_type") not in ("LORA", None) or data.get("use_dora"):
        raise ModelError(f"{adapter_dir} is a {data.get('peft_type')}{' (DoRA)' if data.get('use_dora') else ''} "
                         f"adapter; vLLM serves plain LoRA adapters only. Merge it first: "
                         f"align merge adapter={adapter_dir}, then pass the merged run folder as model=")
    return int(data.get("r", 16))


def engine_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-`rank` adapter."""
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise ModelError(f"LoRA rank {rank} is larger than vLLM serves ({LORA_RANKS[-1]}); merge the adapter "
                         f"(align merge) and serve the merged model")
    return fitting[0]


def model_max_len(model_dir: Path) -> int | None:
    """The context length in the model's config.json (vLLM refuses a larger max_model_len), or None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    lengths = [int(config[k]) for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
               if isinstance(config.get(k), int)]
    return min(lengths) if lengths else None


def version_tuple(version: str) -> tuple[int, int]:
    """'0.16.1rc2' -> (0, 16); an unparseable version ('dev') counts as new."""
    import re

    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (999, 0)


class VLLMSampler:
    """Sampler on a vLLM engine over `base`.

    adapter: a LoRA folder served on top of `base`; lora_rank: start with LoRA enabled but no adapter yet (for
    set_adapter later). logprobs: fill Sample.logprobs with vLLM's log-prob of each sampled token, taken after
    temperature (logprobs_mode="processed_logprobs"; vLLM >= 0.10.2, before that it is before temperature), i.e. of
    the distribution sampled from: what the trainer recomputes from logits / temperature.
    """

    name = "vllm"

    def __init__(self, base: Path, tokenizer: Any, *, adapter: Path | None = None, lora_rank: int | None = None,
                 logprobs: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 2048,
                 trust_remote_code: bool = False, sleep_mode: bool = False) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ModelError(f"backend=vllm needs the vllm package ({e}); install it with "
                             f"pip install -e '.[vllm]' on a CUDA machine, or use backend=hf") from None
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        self.tokenizer = tokenizer
        self.return_logprobs = logprobs
        self.lora_request: Any = None
        self.adapters_sent = 0
        rank = adapter_rank(adapter) if adapter is not None else lora_rank
        self.max_lora_rank = engine_lora_rank(rank) if rank is not None else None
        engine_kwargs: dict[str, Any] = {}
        if self.max_lora_rank is not None:
            # One adapter at a time: set_adapter replaces it, and vLLM evicts the old one from its cache.
            engine_kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        if logprobs:
            engine_kwargs["logprobs_mode"] = "processed_logprobs"
        if sleep_mode:
            engine_kwargs["enable_sleep_mode"] = True
        self.sleep_mode, self.asleep = sleep_mode, False
        self.settings = {"model": str(base), "dtype": DTYPES[dtype], "gpu_memory_utilization": gpu_memory_utilization,
                         "sleep_mode": sleep_mode, "tensor_parallel_size": tensor_parallel_size}
        limit = model_max_len(base)
        self.max_model_len = min(max_model_len, limit) if limit else max_model_len
        if self.max_model_len < max_model_len:
            log.info(f"vllm: max_model_len {max_model_len} -> {self.max_model_len} (the model's context length)")
        self.llm = LLM(model=str(base), tokenizer=str(base), tensor_parallel_size=tensor_parallel_size,
                       dtype=DTYPES[dtype], gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=self.max_model_len, trust_remote_code=trust_remote_code, **engine_kwargs)
        self.settings["max_model_len"] = self.max_model_len
        _OPEN.add(self)
        _STARTED.append(self.describe())
        if adapter is not None:
            self.set_adapter(adapter)

    def describe(self) -> dict[str, Any]:
        """What the engine was given (for the manifest): model, dtype, memory share, sleep mode, ..."""
        return {"backend": "vllm", **self.settings}

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next generate (a no-op without sleep_mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (its worker processes end with it)."""
        import gc

        _OPEN.discard(self)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        gc.collect()
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # vLLM's cleanup below destroys torch's default process group: a multi-process trainer's (PPO) one.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        try:  # what vLLM's own tests call between two engines in one process
            from vllm.distributed import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()

    def set_adapter(self, adapter: Path) -> Any:
        """Serve the LoRA adapter in `adapter` from the next generate on, as a new LoRARequest (new id, new name).

        Call it after each save of an updated adapter, even into the same folder: vLLM caches an adapter under its
        id and keys prefix-cache entries on the id (0.33: on name and path), so only a new id and name make it read
        the new weights and drop KV computed with the old ones.
        """
        if self.max_lora_rank is None:
            raise ModelError("this vLLM engine was started without LoRA; build the sampler with lora_rank= "
                             "(or adapter=) to serve adapters")
        rank = adapter_rank(adapter)
        if rank > self.max_lora_rank:
            raise ModelError(f"{adapter}: LoRA rank {rank} > the engine's max_lora_rank {self.max_lora_rank}; "
                             f"build the sampler with lora_rank={rank}")
        from vllm.lora.request import LoRARequest

        self.adapters_sent += 1
        self.lora_request = LoRARequest(f"adapter-{self.adapters_sent}", self.adapters_sent,
                                        str(Path(adapter).resolve()))
        return self.lora_request

    def load_weights(self, model_dir: Path) -> None:
        """Full fine-tuning: load the weights saved in `model_dir` (save_pretrained, safetensors) into the running
        engine, in place, then drop the prefix cache, whose KV entries came from the old weights."""
        import vllm

        if version_tuple(vllm.__version__) < RELOAD_WITH_PATH:
            raise ModelError(f"loading new weights into a running engine needs vllm>=0.16 (reload_weights with "
                             f"weights_path); this is {vllm.__version__}: pip install 'vllm>=0.16,<0.34'")
        model_dir = Path(model_dir).resolve()
        self.wake()
        if not list(model_dir.glob("*.safetensors")):
            raise ModelError(f"{model_dir} has no *.safetensors weights; save the policy with "
                             f"save_pretrained(dir) (safetensors is the default) before load_weights")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[Message]], params: SamplingSettings, n: int = 1,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        """seeds: one per prompt instead of params.seed (a per-request seed in vLLM: a prompt's samples then do not
        depend on the other requests of the batch)."""
        from vllm import SamplingParams, TokensPrompt

        if params.temperature > MAX_TEMPERATURE:
            raise ConfigError(f"temperature={params.temperature}: vLLM samples with temperature in [0, "
                              f"{MAX_TEMPERATURE:g}]; lower it or use backend=hf")
        ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        self.wake()
        for i, p in enumerate(ids):
            if len(p) >= self.max_model_len:
                raise DataError(f"prompt {i} is {len(p)} tokens; vLLM needs it shorter than max_model_len="
                                f"{self.max_model_len}: shorten it or raise engine.max_model_len")
        greedy = params.temperature <= 0
        # vLLM refuses n > 1 with greedy sampling (all n would be equal): ask once and copy.
        def request(seed: int) -> Any:
            return SamplingParams(n=1 if greedy else n, temperature=0.0 if greedy else params.temperature,
                                  top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
                                  seed=seed, skip_special_tokens=True,
                                  logprobs=0 if self.return_logprobs else None)  # 0: just the sampled token's

        sp = request(params.seed) if seeds is None else [request(seed) for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], sp, use_tqdm=False,
                                 lora_request=self.lora_request)
        return [[self._sample(o, p) for o in (out.outputs * n if greedy else out.outputs)]
                for p, out in zip(ids, outs)]

    def _sample(self, out: Any, prompt_ids: list[int]) -> Sample:
        token_ids = list(out.token_ids)
        logprobs = None
        if self.return_logprobs:
            logprobs = [position[token].logprob for token, position in zip(token_ids, out.logprobs)]
        return Sample(text=out.text.strip(), prompt_ids=list(prompt_ids), response_ids=token_ids,
                      finished=out.finish_reason == "stop", logprobs=logprobs)
