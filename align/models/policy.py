"""The policy lifecycle, decided once: which PEFT method each stage accepts, how a policy (and its reference)
is loaded for training or inference, and how the trained policy is saved.

Every training stage asks `check_method(stage, method)` and calls `load_policy` / `save_policy`; nothing else
decides whether a base is quantized, whether the reference is a frozen copy, or where an adapter's base lives.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.errors import ConfigError
from align.models.load import (
    QUANTIZED_BASE,
    base_of_adapter,
    base_reference,
    load_model,
    load_tokenizer,
    resolve_model,
)
from align.models.peft import PeftSettings, attach_peft, check_experts, expert_weights

Stage = Literal["sft", "reward", "dpo", "ppo", "grpo", "rloo", "online"]


@dataclass(frozen=True)
class MethodCaps:
    """What a PEFT method is and where it may be used."""

    adapter: bool  # saves a PEFT adapter folder (else a full model folder)
    mergeable: bool  # can be folded into the base weights (LoRA family)
    quantized_base: bool  # loads the base in 4-bit (bitsandbytes nf4)
    reference: Literal["adapter_disabled", "frozen_copy", "none"]  # how RL stages get the reference policy
    stages: frozenset[str]


_ALL = frozenset({"sft", "reward", "dpo", "ppo", "grpo", "rloo", "online"})
_PROMPT = frozenset({"sft"})
# The reference of an RL stage must equal the starting policy: an adapter-disabled model is that only for a fresh
# LoRA/DoRA/IA3 (identity at init); GRPO/RLOO go through TRL, which wants an adapter (it would reload a full
# model's base by name). AdaLoRA reallocates rank on a schedule only the Trainer stages run.
METHODS: dict[str, MethodCaps] = {
    "lora": MethodCaps(True, True, False, "adapter_disabled", _ALL),
    "qlora": MethodCaps(True, True, True, "adapter_disabled", _ALL),
    "dora": MethodCaps(True, True, False, "adapter_disabled", _ALL),
    "adalora": MethodCaps(True, True, False, "adapter_disabled", frozenset({"sft", "reward"})),
    "ia3": MethodCaps(True, True, False, "adapter_disabled", frozenset({"sft", "reward", "dpo", "online"})),
    "prompt_tuning": MethodCaps(True, False, False, "adapter_disabled", _PROMPT),
    "prefix_tuning": MethodCaps(True, False, False, "adapter_disabled", _PROMPT),
    "p_tuning": MethodCaps(True, False, False, "adapter_disabled", _PROMPT),
    "freeze": MethodCaps(False, False, False, "frozen_copy", frozenset({"sft", "reward"})),
    "bitfit": MethodCaps(False, False, False, "frozen_copy", frozenset({"sft", "reward"})),
    "full": MethodCaps(False, False, False, "frozen_copy", frozenset({"sft", "reward", "dpo", "ppo", "online"})),
    # a gate over several LoRA experts: not one set of weights to merge; trained by SFT, used as it is (reload, generate)
    "xlora": MethodCaps(True, False, False, "none", frozenset({"sft"})),
}


def methods_for(stage: str) -> list[str]:
    return [m for m, caps in METHODS.items() if stage in caps.stages]


def check_method(stage: str, method: str) -> MethodCaps:
    """The method's capabilities, or a ConfigError naming the methods this stage supports."""
    caps = METHODS.get(method)
    if caps is None or stage not in caps.stages:
        raise ConfigError(f"peft.method={method} is not supported by {stage}; use one of "
                          f"{', '.join(methods_for(stage))}")
    return caps


@dataclass
class Policy:
    """A loaded policy: the model (with a fresh PEFT method attached when loaded for training), its tokenizer,
    the reference (a frozen copy for full-weight methods; None when the reference is the adapter disabled),
    the resolved source folder and a sentence saying what is trained."""

    model: Any
    tokenizer: Any
    reference: Any | None
    source: Path
    trained: str = ""


def load_policy(source: str | Path, *, stage: str, peft: PeftSettings | None = None, dtype: str = "auto",
                trust_remote_code: bool = False, total_steps: int = 100, kind: str = "causal_lm") -> Policy:
    """Load `source` ('default', a model/adapter folder or a run folder).

    With `peft` (training): the source is merged into plain weights (a 4-bit base for qlora), the method is
    attached fresh, and a frozen reference copy is kept only for full-weight methods. With kind='classifier' the
    model gets a one-output score head that stays trainable (reward models).
    Without `peft` (inference): an adapter stays a live PeftModel, so `disable_adapter()` gives its reference.
    """
    path = resolve_model(source)
    tokenizer = load_tokenizer(path, trust_remote_code)
    if peft is None:
        # An adapter stays a live PeftModel over the base it was trained on (`load_model`).
        model = (load_xlora(path, dtype, trust_remote_code) if is_xlora(path) else
                 load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, merge=False))
        return Policy(model.eval(), tokenizer, None, path)
    caps = check_method(stage, peft.method)
    if peft.method == "xlora":
        check_experts(peft, path)
    model = load_model(path, dtype=dtype, load_in_4bit=caps.quantized_base, merge=True, kind=kind,
                       trust_remote_code=trust_remote_code)
    if kind == "classifier":
        model.config.pad_token_id = tokenizer.pad_token_id
    reference = None
    if caps.reference == "frozen_copy" and kind == "causal_lm" and stage != "sft":
        reference = copy.deepcopy(model).requires_grad_(False).eval()  # full weights move: keep the start
    model, trained = attach_peft(model, peft, total_steps=total_steps,
                                 task_type="SEQ_CLS" if kind == "classifier" else "CAUSAL_LM",
                                 extra_trainable=("score",) if kind == "classifier" else ())
    return Policy(model, tokenizer, reference, path, trained)


def save_policy(model: Any, tokenizer: Any, out: Path, *, method: str, base: Path) -> Path:
    """Save a trained policy to `out`: the adapter only ('default'; TRL may hold a frozen 'ref' copy too) pointed
    at `base` so it reloads from anywhere, or the full model. Weights are safetensors."""
    out = Path(out)
    if METHODS[method].adapter:
        model.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
        point_adapter_at(out, base)
        if method == "xlora":
            save_experts(model, out)
        if METHODS[method].quantized_base:  # how to rebuild the exact base it trained on (`load_model`)
            (out / QUANTIZED_BASE).write_text(json.dumps({"load_in_4bit": True, "quant_type": "nf4",
                                                          "double_quant": True}, indent=2))
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def is_xlora(path: Path) -> bool:
    config = Path(path) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") == "XLORA"


XLORA_GATE = "xlora_gate.safetensors"


def save_experts(model: Any, out: Path) -> None:
    """An X-LoRA folder holds its gate (xlora_gate.safetensors: peft 0.21's own save drops it, its adapter-name
    filter takes the experts' names "0", "1" for module indices) and its experts (out/experts/<i>/, as trained:
    frozen or not), named there, so it reloads without the expert runs it was built from."""
    from safetensors.torch import save_file

    gate = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}
    save_file(gate, out / XLORA_GATE)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    names = list(config["adapters"])
    for name, weights, source in zip(names, expert_weights(model, len(names)), config["adapters"].values()):
        folder = out / "experts" / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / "adapter_config.json", folder / "adapter_config.json")
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, folder / "adapter_model.safetensors")
        config["adapters"][name] = f"experts/{name}"  # relative to the X-LoRA folder: it can move (load_xlora)
    config_path.write_text(json.dumps(config, indent=2))


def load_xlora(path: Path, dtype: str, trust_remote_code: bool) -> Any:
    """An X-LoRA folder on its base: experts from its experts/ folder, the gate from xlora_gate.safetensors."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    base = load_model(base_of_adapter(path), dtype=dtype, trust_remote_code=trust_remote_code, merge=True)
    base.config.use_cache = False  # X-LoRA refuses a KV cache
    config = PeftConfig.from_pretrained(path)  # experts named relative to the folder (older runs: absolute)
    config.adapters = {name: str(Path(path, folder).resolve()) for name, folder in config.adapters.items()}
    model = PeftModel.from_pretrained(base, path, config=config)
    gate = load_file(Path(path) / XLORA_GATE)
    missing = set(gate) - set(model.state_dict())
    if missing or not gate:
        raise ConfigError(f"{path}: the X-LoRA gate weights do not fit this model ({sorted(missing)[:2]})")
    model.load_state_dict(gate, strict=False)
    return model


def point_adapter_at(adapter_dir: Path, base: Path) -> None:
    """Record the model an adapter was trained on (itself possibly an adapter, which `load_model` merges first) in
    adapter_config.json, portably: a Hub ID and commit, a path relative to the adapter, or an absolute path
    (`base_reference`)."""
    path = Path(adapter_dir) / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"], data["revision"] = base_reference(adapter_dir, base)
    path.write_text(json.dumps(data, indent=2))
