"""LLM, the offline engine. Source: vllm/entrypoints/llm.py (+ vllm/engine/arg_utils.py EngineArgs), 0.10.0-0.33.0.

- LLM(model, *, tokenizer=None, ..., **kwargs): named parameters and **kwargs both end in EngineArgs, a dataclass,
  so an unknown name raises TypeError. Accepted here: the names valid in EVERY version checked (ENGINE_ARGS).
- generate(prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None) -> list[RequestOutput]
  (0.10.0 also took these by position; only this form works everywhere).
- collective_rpc(method, timeout=None, args=(), kwargs=None) -> list (one result per worker): identical 0.10.0-0.33.0.
  Mirrored method: "reload_weights" (v1/worker/gpu_worker.py): no arguments up to 0.15; from 0.16.0 the model
  runner's reload_weights(weights_iterator=None, weights_path=None, is_checkpoint_format=True) loads
  `weights_path` in place (docs/features/sleep_mode.md documents collective_rpc("reload_weights")).
- reset_prefix_cache() with no arguments: valid in every version (its parameters changed in 0.15).
- sleep(level=1) / wake_up(tags=None): identical 0.10.0-0.33.0; the engine core asserts "Sleep mode is not enabled
  in the model config" unless the engine was built with enable_sleep_mode=True (v1/engine/core.py); requests while
  asleep are the caller's error ("The caller should guarantee that no requests are being processed during the
  sleep period"), asserted here.
- dtype="auto" (config/model.py _get_and_verify_dtype): the config.json's torch_dtype, except float32, which is
  served in float16 (0.10.0's documented rule; later versions pick the platform's 16-bit type): a float32 folder is
  never served in float32 unless asked. `served_dtype` records the result.
Engine checks mirrored: max_model_len <= the model's derived length (config/model.py _get_and_verify_max_len),
attention heads divisible by tensor_parallel_size (ParallelConfig), max_lora_rank in the supported sizes
(LoRAConfig), LoRA requests need enable_lora, an adapter's rank <= max_lora_rank, prompts are non-empty and
shorter than max_model_len (v1 input processor).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm.inputs import TOKENS_PROMPT_KEYS
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, Logprob, RequestOutput
from vllm.sampling_params import _SAMPLING_EPS, SamplingParams

# EngineArgs fields + LLM.__init__ parameters present in 0.10.0, 0.10.2, 0.15.0-0.20.0, 0.25.0, 0.30.0 and 0.33.0.
ENGINE_ARGS = frozenset("""
additional_config allowed_local_media_path async_scheduling block_size code_revision collect_detailed_traces
compilation_config config_format cpu_offload_gb data_parallel_address data_parallel_backend data_parallel_hybrid_lb
data_parallel_rank data_parallel_rpc_port data_parallel_size data_parallel_size_local data_parallel_start_rank
default_mm_loras disable_cascade_attn disable_chunked_mm_input disable_custom_all_reduce
disable_hybrid_kv_cache_manager disable_log_stats disable_sliding_window distributed_executor_backend download_dir
dtype enable_chunked_prefill enable_eplb enable_expert_parallel enable_lora enable_prefix_caching
enable_prompt_embeds enable_sleep_mode enforce_eager fully_sharded_loras generation_config gpu_memory_utilization
hf_config_path hf_overrides hf_token ignore_patterns interleave_mm_strings kv_cache_dtype kv_events_config
kv_transfer_config limit_mm_per_prompt load_format logprobs_mode long_prefill_token_threshold lora_dtype
max_cpu_loras max_logprobs max_lora_rank max_loras max_model_len max_num_batched_tokens max_num_seqs
max_parallel_loading_workers media_io_kwargs mm_processor_kwargs model model_impl model_loader_extra_config
num_gpu_blocks_override otlp_traces_endpoint override_generation_config pipeline_parallel_size
prefix_caching_hash_algo pt_load_map_location quantization ray_workers_use_nsight reasoning_parser revision
scheduler_cls scheduling_policy seed served_model_name show_hidden_metrics_for_version skip_tokenizer_init
speculative_config tensor_parallel_size tokenizer tokenizer_mode tokenizer_revision trust_remote_code
use_tqdm_on_load worker_cls worker_extension_cls
""".split())  # noqa: SIM905 (89 names read better as words)
MODEL_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # ModelDType, 0.10.0 and 0.33.0
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # 0.10.0 possible_max_ranks (0.33.0 adds 1)
# Llama's LoRA-able modules (packed qkv_proj / gate_up_proj unpacked), the decoder models align trains.
LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
# config.json keys vLLM derives the context length from (the smallest present wins).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                 "max_seq_length", "seq_len")
# The fake's vocabulary (tokenized with the real tokenizer): words, and the letters an `llm` judge reads.
_WORDS = " yes no maybe soup salt pepper basil lemon A B"


def _check(name: str, value: Any, *types: type) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{name} must be {' | '.join(t.__name__ for t in types)}, got {type(value).__name__}")


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        from transformers import AutoTokenizer

        for key in kwargs:
            if key not in ENGINE_ARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{key}'")
        args = {"tokenizer": None, "tensor_parallel_size": 1, "dtype": "auto", "gpu_memory_utilization": 0.9,
                "max_model_len": None, "trust_remote_code": False, "enable_lora": False, "max_lora_rank": 16,
                "max_loras": 1, "logprobs_mode": "raw_logprobs", "seed": 0, "max_logprobs": 20, **kwargs}
        _check("model", model, str)
        _check("tokenizer", args["tokenizer"], str, type(None))
        _check("tensor_parallel_size", args["tensor_parallel_size"], int)
        _check("gpu_memory_utilization", args["gpu_memory_utilization"], float, int)
        _check("max_model_len", args["max_model_len"], int, type(None))
        for flag in ("trust_remote_code", "enable_lora"):
            _check(flag, args[flag], bool)
        _check("max_loras", args["max_loras"], int)
        if args["dtype"] not in MODEL_DTYPES:
            raise ValueError(f"Unknown dtype: {args['dtype']!r}; expected one of {MODEL_DTYPES}")
        if args["logprobs_mode"] not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {args['logprobs_mode']!r}")
        if not 0 < args["gpu_memory_utilization"] <= 1:
            raise ValueError(f"GPU memory utilization must be in (0, 1], got {args['gpu_memory_utilization']}")
        if args["enable_lora"] and args["max_lora_rank"] not in LORA_RANKS:
            raise ValueError(f"max_lora_rank ({args['max_lora_rank']}) must be one of {LORA_RANKS}.")
        config = self._model_config(model)
        tp = args["tensor_parallel_size"]
        if tp < 1 or config.get("num_attention_heads", tp) % tp:
            raise ValueError(f"Total number of attention heads ({config.get('num_attention_heads')}) must be "
                             f"divisible by tensor parallel size ({tp}).")
        derived = min([int(config[k]) for k in _MAX_LEN_KEYS if k in config] or [2048])
        if args["max_model_len"] is not None and args["max_model_len"] > derived:
            raise ValueError(f"User-specified max_model_len ({args['max_model_len']}) is greater than the derived "
                             f"max_model_len ({derived}) in model's config.json). To allow overriding this "
                             f"maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")
        self.max_model_len = args["max_model_len"] or derived
        saved = config.get("torch_dtype") or config.get("dtype") or "float32"
        auto = "float16" if saved == "float32" else saved
        self.served_dtype = {"auto": auto, "half": "float16", "float": "float32"}.get(args["dtype"], args["dtype"])
        self.sleeping = False
        self.tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"] or model,
                                                       trust_remote_code=args["trust_remote_code"])
        self._words = self.tokenizer.encode(_WORDS, add_special_tokens=False)
        # Fake-only state, read by the tests.
        self.engine_args = {"model": model, **args}
        self.model_path = model
        self.weights_version = 0
        self.loaded_loras: dict[int, tuple[str, str]] = {}
        self.requests: list[tuple[list[int], SamplingParams, LoRARequest | None]] = []
        self.rpc_calls: list[tuple[str, tuple, dict]] = []
        self._stale_prefix_cache = False
        self._request_counter = 0

    @staticmethod
    def _model_config(model: str) -> dict[str, Any]:
        path = Path(model) / "config.json"
        if not path.is_file():
            raise OSError(f"fake vllm: {model} is not a local model folder with a config.json")
        return json.loads(path.read_text())

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | Callable[..., Any] = True,
                 lora_request: Sequence[LoRARequest] | LoRARequest | None = None,
                 priority: int | Sequence[int] | None = None) -> list[RequestOutput]:
        if not (isinstance(use_tqdm, bool) or callable(use_tqdm)):
            raise TypeError(f"use_tqdm must be a bool or a callable, got {type(use_tqdm).__name__}")
        assert not self.sleeping, "fake vllm: generate while the engine sleeps (call wake_up() first)"
        assert not self._stale_prefix_cache, (
            "fake vllm: generate after reload_weights without reset_prefix_cache(): real vLLM would reuse KV "
            "cached from the old weights")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._per_prompt(sampling_params if sampling_params is not None else SamplingParams(), prompts,
                                  SamplingParams, "sampling_params")
        loras = self._per_prompt(lora_request, prompts, LoRARequest, "lora_request")
        outputs = []
        for prompt, sp, lora in zip(prompts, params, loras):
            ids = self._prompt_ids(prompt)
            if sp.logprobs and sp.logprobs > self.engine_args["max_logprobs"]:  # v1 engine processor
                raise ValueError(f"Requested sample logprobs of {sp.logprobs}, which is greater than max allowed: "
                                 f"{self.engine_args['max_logprobs']}")
            self._check_lora(lora)
            self.requests.append((ids, sp, lora))
            self._request_counter += 1
            completions = [self._complete(ids, sp, lora, i) for i in range(sp.n)]
            outputs.append(RequestOutput(request_id=str(self._request_counter), prompt=None, prompt_token_ids=ids,
                                         prompt_logprobs=None, outputs=completions, finished=True,
                                         lora_request=lora))
        return outputs

    @staticmethod
    def _per_prompt(value: Any, prompts: list, cls: type, name: str) -> list:
        if value is None or isinstance(value, cls):
            return [value] * len(prompts)
        value = list(value)
        if len(value) != len(prompts):
            raise ValueError(f"The lengths of prompts and {name} must be the same.")
        for v in value:
            _check(name, v, cls, type(None))
        return value

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            unknown = set(prompt) - TOKENS_PROMPT_KEYS
            if unknown:
                raise TypeError(f"fake vllm: TokensPrompt keys {sorted(unknown)} are not valid in every version")
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError("prompt_token_ids must be a list[int]")
        else:
            raise TypeError(f"fake vllm: a prompt is a str or a TokensPrompt dict, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens "
                             f"(at least 1) is longer than the maximum model length of {self.max_model_len}.")
        return ids

    def _check_lora(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        if not self.engine_args["enable_lora"]:
            raise ValueError(f"Got lora_request {lora} but LoRA is not enabled!")
        config = Path(lora.lora_path) / "adapter_config.json"
        if not config.is_file():
            raise ValueError(f"Loading lora {lora.lora_name} failed: No adapter found for {lora.lora_path}")
        rank = int(json.loads(config.read_text()).get("r", 0))
        if rank > self.engine_args["max_lora_rank"]:
            raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank {self.engine_args['max_lora_rank']}.")
        if lora.lora_int_id not in self.loaded_loras:
            self._check_lora_modules(lora)
        seen = self.loaded_loras.setdefault(lora.lora_int_id, (lora.lora_name, lora.lora_path))
        # vLLM caches an adapter by its int id and never rereads it: a reused id would serve the stale adapter.
        assert seen == (lora.lora_name, lora.lora_path), (
            f"fake vllm: lora_int_id {lora.lora_int_id} was {seen}, now {(lora.lora_name, lora.lora_path)}: "
            f"vLLM would keep serving the adapter it cached first")

    @staticmethod
    def _check_lora_modules(lora: LoRARequest) -> None:
        """lora/models.py (0.10.0) / lora/lora_model.py (0.33.0) from_local_checkpoint: every tensor in
        adapter_model.safetensors must belong to a module vLLM can put LoRA on (extra full modules such as a
        value head are refused)."""
        from safetensors import safe_open

        unexpected = []
        with safe_open(str(Path(lora.lora_path) / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                parts = key.split(".")
                cut = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), len(parts) - 1)
                if parts[cut - 1] not in LORA_MODULES:
                    unexpected.append(".".join(parts[:cut]))
        if unexpected:
            raise ValueError(f"While loading {lora.lora_path}, expected target modules in {sorted(LORA_MODULES)} "
                             f"but received {unexpected}. Please verify that the loaded LoRA module is correct")

    def _complete(self, ids: list[int], sp: SamplingParams, lora: LoRARequest | None,
                  index: int) -> CompletionOutput:
        greedy = sp.temperature < _SAMPLING_EPS
        key = (tuple(ids), None if greedy else sp.seed, index, lora.lora_int_id if lora else 0,
               self.weights_version)
        h = zlib.crc32(repr(key).encode())
        natural = 1 + h % 12  # words before EOS
        budget = min(sp.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        start = (h >> 4) % len(self._words)
        tokens = [self._words[(start + i) % len(self._words)] for i in range(natural)]
        tokens.append(self.tokenizer.eos_token_id)
        stopped = len(tokens) <= budget
        tokens = tokens[:budget]
        text_ids = tokens[:-1] if stopped else tokens
        text = self.tokenizer.decode(text_ids, skip_special_tokens=sp.skip_special_tokens)
        logprobs = None
        if sp.logprobs is not None:  # per position: the top `logprobs` candidates, plus the sampled token
            logprobs = []
            for pos, token in enumerate(tokens):
                scores = {w: -(zlib.crc32(f"{h}/{pos}/{w}".encode()) % 16 + 1) / 4 for w in set(self._words)}
                top = sorted(scores, key=lambda w: (-scores[w], w))[: sp.logprobs]
                entry = {w: Logprob(scores[w], rank=r + 1) for r, w in enumerate(top)}
                entry[token] = Logprob(-((h + pos) % 7 + 1) / 4, rank=1)  # deterministic, in [-1.75, -0.25]
                logprobs.append(entry)
        return CompletionOutput(index=index, text=text, token_ids=tokens,
                                cumulative_logprob=sum(p[t].logprob for p, t in zip(logprobs, tokens))
                                if logprobs is not None else None,
                                logprobs=logprobs, finish_reason="stop" if stopped else "length",
                                lora_request=lora)

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if not isinstance(method, str):
            raise NotImplementedError("fake vllm: only named worker methods are mirrored")
        kwargs = dict(kwargs or {})
        self.rpc_calls.append((method, tuple(args), kwargs))
        if method != "reload_weights":
            raise AttributeError(f"fake vllm: worker method {method!r} is not mirrored")
        unknown = set(kwargs) - {"weights_iterator", "weights_path", "is_checkpoint_format"}
        if unknown or args:
            raise TypeError(f"reload_weights() got unexpected arguments {sorted(unknown) or args}")
        path = kwargs.get("weights_path") or self.model_path
        old, new = self._model_config(self.model_path), self._model_config(path)
        shape = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size")
        if [old.get(k) for k in shape] != [new.get(k) for k in shape]:
            raise ValueError(f"fake vllm: {path} is not the same architecture as {self.model_path}")
        if not list(Path(path).glob("*.safetensors")):
            raise RuntimeError(f"Cannot find any model weights with {path}")
        self.model_path = path
        self.weights_version += 1
        self._stale_prefix_cache = True
        return [None] * self.engine_args["tensor_parallel_size"]

    def sleep(self, level: int = 1) -> None:
        assert self.engine_args.get("enable_sleep_mode"), "Sleep mode is not enabled in the model config"
        _check("level", level, int)
        self.reset_prefix_cache()
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        assert self.engine_args.get("enable_sleep_mode"), "Sleep mode is not enabled in the model config"
        if tags is not None and not set(tags) <= {"weights", "kv_cache"}:
            raise ValueError(f"wake_up tags must be in ('weights', 'kv_cache'), got {tags}")
        self.sleeping = False

    def reset_prefix_cache(self) -> bool:
        self._stale_prefix_cache = False
        return True
