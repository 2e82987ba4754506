"""PEFT methods: one function per family, chosen by `peft.method`, and how each one saves.

LoRA-family and prompt-learning methods save a PEFT adapter (reloads with `PeftModel.from_pretrained`);
`freeze`, `bitfit` and `full` change base weights and save a full model folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from align.config import opt
from align.errors import ConfigError
from align.models.fused_lora import fuse_lora
from align.models.lean import lean_lora_dropout, lean_swiglu

Method = Literal["lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                 "freeze", "bitfit", "full", "xlora"]
ADAPTER_METHODS = {"lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "xlora"}
MERGEABLE_METHODS = {"lora", "qlora", "dora", "adalora", "ia3"}


@dataclass(frozen=True)
class PeftSettings:
    method: Method = opt("lora", "lora | qlora (4-bit nf4 base + LoRA) | dora | adalora | ia3 | prompt_tuning | "
                                 "prefix_tuning | p_tuning | freeze (last N blocks) | bitfit (biases) | full | "
                                 "xlora (a learned gate mixing the LoRA adapters of peft.experts per token)")
    r: int = opt(16, "LoRA-family rank (adalora: the target average rank)", ge=1)
    alpha: int = opt(32, "LoRA-family scaling numerator (scale = alpha / r)", ge=1)
    dropout: float = opt(0.05, "dropout on the LoRA-family input", ge=0.0, lt=1.0)
    target_modules: list[str] = opt(["all-linear"], "modules to adapt; 'all-linear' = every linear but the LM head")
    num_virtual_tokens: int = opt(16, "prompt_tuning / prefix_tuning / p_tuning: number of virtual tokens", ge=1)
    freeze_trainable_layers: int = opt(2, "freeze: train only the last N transformer blocks (+ final norm)", ge=1)
    experts: list[str] = opt([], "xlora: the LoRA experts, as run folders of align sft (or adapter folders) "
                                 "trained on this stage's base model")
    xlora_depth: int = opt(1, "xlora: layers of the gate (1: one linear layer over the last hidden state)", ge=1)
    xlora_train_experts: bool = opt(False, "xlora: train the experts' LoRA weights too (else only the gate)")


def _lora_kwargs(s: PeftSettings) -> dict[str, Any]:
    targets: Any = s.target_modules[0] if s.target_modules == ["all-linear"] else list(s.target_modules)
    return {"r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "target_modules": targets,
            "task_type": "CAUSAL_LM"}


def _layers(model: Any) -> torch.nn.ModuleList:
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ConfigError("peft.method=freeze: could not find the transformer blocks of this architecture")


def _set_trainable(model: Any, keep: Callable[[str], bool]) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
        if p.requires_grad:
            names.append(name)
    return names


def attach_peft(model: Any, s: PeftSettings, *, total_steps: int = 100, task_type: str = "CAUSAL_LM",
                extra_trainable: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Wrap/prepare `model` for method `s.method`. Returns (model, a sentence saying what is trained).

    `extra_trainable` names parameter-name fragments that stay trainable too (e.g. a reward model's `score`).
    """
    import peft

    m = s.method
    if m in ("lora", "qlora", "dora", "adalora", "ia3"):
        if m == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        kwargs = _lora_kwargs(s) | {"task_type": task_type, "modules_to_save": list(extra_trainable) or None}
        if m == "adalora":
            # AdaLoRA reallocates rank during training; it needs the schedule length (see AdaLoraCallback).
            kwargs.update(init_r=max(s.r * 3 // 2, 2), target_r=s.r, total_step=max(total_steps, 4),
                          tinit=0, tfinal=0, deltaT=1)
            kwargs.pop("r")
            config: Any = peft.AdaLoraConfig(**kwargs)
        elif m == "ia3":
            config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                    task_type=task_type, modules_to_save=kwargs["modules_to_save"])
        else:
            config = peft.LoraConfig(**kwargs, use_dora=(m == "dora"))
        model = peft.get_peft_model(model, config)
        lean_lora_dropout(model)  # the same dropout, without a float copy of each adapted input kept for backward
        fuse_lora(model)  # the same sum, in one autograd node per adapted layer
        targets = ["k_proj", "v_proj", "down_proj"] if m == "ia3" else s.target_modules
        what = f"{m} adapters on {targets}" + (f" + {list(extra_trainable)}" if extra_trainable else "")
    elif m in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        cls = {"prompt_tuning": peft.PromptTuningConfig, "prefix_tuning": peft.PrefixTuningConfig,
               "p_tuning": peft.PromptEncoderConfig}[m]
        model = peft.get_peft_model(model, cls(task_type=task_type, num_virtual_tokens=s.num_virtual_tokens))
        what = f"{s.num_virtual_tokens} virtual tokens ({m}); the model's weights are frozen"
    elif m == "freeze":
        layers = _layers(model)
        n = min(s.freeze_trainable_layers, len(layers))
        keep_ids = {id(p) for layer in list(layers)[len(layers) - n:] for p in layer.parameters()}
        names = [name for name, p in model.named_parameters() if id(p) in keep_ids]
        final_norm = [name for name, _ in model.named_parameters()
                      if name.endswith(("model.norm.weight", "final_layer_norm.weight", "ln_f.weight"))]
        keep = set(names) | set(final_norm)
        _set_trainable(model, lambda name: name in keep or any(x in name for x in extra_trainable))
        what = f"the last {n} of {len(layers)} transformer blocks and the final norm"
    elif m == "bitfit":
        biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
        if biases:
            _set_trainable(model, lambda name: name.endswith(".bias") or any(x in name for x in extra_trainable))
            what = f"{len(biases)} bias vectors"
        else:
            # Llama-style models have no biases at all; the nearest per-channel parameters are the norm scales.
            _set_trainable(model, lambda name: "norm" in name.split(".")[-2] or any(x in name for x in extra_trainable))
            what = "the model has no bias vectors (Llama-style), so bitfit trains the normalization scales instead"
    elif m == "full":
        _set_trainable(model, lambda name: True)
        what = "every parameter"
    elif m == "xlora":
        model, what = attach_xlora(model, s, task_type)
    else:  # pragma: no cover - Literal type already checked by the config
        raise ConfigError(f"peft.method={m!r} is not a known method")
    lean_swiglu(model)  # the same MLP, one activation fewer kept for backward
    return model, what


def expert_folders(s: PeftSettings) -> list[Path]:
    """The adapter folders of `peft.experts` (run folders resolve to their model/), each a plain LoRA adapter."""
    from align.models.load import is_adapter, resolve_model

    if len(s.experts) < 2:
        raise ConfigError("peft.method=xlora needs peft.experts: two or more LoRA adapters (align sft run folders)")
    out = []
    for name in s.experts:
        folder = resolve_model(name)
        config = json.loads((folder / "adapter_config.json").read_text()) if is_adapter(folder) else {}
        kind = "DORA" if config.get("use_dora") else config.get("peft_type")
        if kind != "LORA":
            raise ConfigError(f"peft.experts: {name} is not a LoRA adapter ({kind or 'a full model'}); train each "
                              f"expert with align sft peft.method=lora")
        out.append(folder)
    return out


def check_experts(s: PeftSettings, base: Path) -> None:
    """Every expert must have been trained on `base` (the model the gate is trained on)."""
    from align.models.load import base_of_adapter

    for name, folder in zip(s.experts, expert_folders(s)):
        if base_of_adapter(folder).resolve() != Path(base).resolve():
            raise ConfigError(f"peft.experts: {name} was trained on {base_of_adapter(folder)}, not on this stage's "
                              f"model {base}; give model= the experts' base")


def attach_xlora(model: Any, s: PeftSettings, task_type: str) -> tuple[Any, str]:
    """X-LoRA (peft's XLoraConfig): the experts' LoRA weights loaded frozen (unless xlora_train_experts) and a gate
    that reads the base model's last hidden state and gives every token a softmax weight per expert. Each forward
    runs the base model once more without adapters for the gate (about twice the compute of LoRA)."""
    import peft

    folders = expert_folders(s)
    model.config.use_cache = False  # X-LoRA refuses a KV cache (each step's gate needs the whole sequence)
    config = peft.XLoraConfig(task_type=task_type, hidden_size=model.config.get_text_config().hidden_size,
                              adapters={str(i): str(f) for i, f in enumerate(folders)}, xlora_depth=s.xlora_depth,
                              use_trainable_adapters=s.xlora_train_experts)
    base = model
    model = peft.get_peft_model(model, config)
    base.register_forward_pre_hook(_plain_gate_pass, prepend=True)
    _set_trainable(model, lambda name: "internal_xlora_classifier" in name
                   or (s.xlora_train_experts and ".lora_" in name))
    what = f"an X-LoRA gate over {len(folders)} LoRA experts" + (" and the experts" if s.xlora_train_experts else
                                                                   " (experts frozen)")
    return model, what


FUSED_KEYS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")


def _plain_gate_pass(module: Any, args: Any) -> None:
    """Keep X-LoRA's gate pass a plain forward under TRL's fused LM head.

    The gate reads the hidden states of a first, adapter-free pass that X-LoRA runs by calling the base model's
    `forward` with the trainer's own arguments plus output_hidden_states=True. TRL (and `compact_lm_head`) replace
    that `forward` on the instance with a fused head returning per-token log-probs and no hidden states. Before each
    call, this hook wraps whatever `forward` the instance has now, so that the gate pass (output_hidden_states with
    fused_lm_head) runs the model class's plain forward; every other call goes to the forward it wrapped.
    """
    current = module.__dict__.get("forward")
    if current is None or getattr(current, "_xlora_gate_pass", False):
        return

    def forward(*a: Any, **kw: Any) -> Any:
        if kw.get("output_hidden_states") and kw.get("fused_lm_head"):
            plain = {k: v for k, v in kw.items() if k not in FUSED_KEYS}
            return type(module).forward(module, *a, **plain)
        return current(*a, **kw)

    forward._xlora_gate_pass = True  # type: ignore[attr-defined]
    module.forward = forward


def expert_weights(model: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """The LoRA weights of each X-LoRA expert (adapters "0".."n-1"), keyed as in a saved LoRA adapter file.

    Read from the state dict by hand: peft's get_peft_model_state_dict filters adapters by name, and the names
    X-LoRA gives its experts ("0", "1", ...) are also module indices ("layers.0"), so it drops or mixes up keys."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, value in model.state_dict().items():
        found = re.search(r"\.(lora_[AB])\.(\d+)\.weight$", key)
        if found and "lora_model.model." in key and int(found.group(2)) < n:
            module = key[:found.start()].split("lora_model.model.", 1)[1]
            out[int(found.group(2))][f"base_model.model.{module}.{found.group(1)}.weight"] = value
    return out


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def adalora_callback(model: Any) -> Any:
    """A Trainer callback running AdaLoRA's rank reallocation after each optimizer step (the Trainer does not)."""
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model.base_model.update_and_allocate(state.global_step)

    return AdaLoraCallback()


def param_checksums(model: Any) -> dict[str, tuple[bool, float]]:
    """name -> (trainable, checksum): a cheap fingerprint to tell which tensors training changed."""
    out = {}
    for name, p in model.named_parameters():
        data = p.detach()
        out[name] = (p.requires_grad, float(data.double().sum() + data.double().abs().sum() * 1e-3))
    return out


def changed_tensors(before: dict[str, tuple[bool, float]], after: dict[str, tuple[bool, float]]) -> dict[str, int]:
    """Counts of trainable/frozen tensors whose checksum changed (frozen ones must stay at 0)."""
    counts = {"trainable_tensors": 0, "trainable_tensors_changed": 0, "frozen_tensors_changed": 0}
    for name, (trainable, value) in before.items():
        moved = name in after and after[name][1] != value
        if trainable:
            counts["trainable_tensors"] += 1
            counts["trainable_tensors_changed"] += int(moved)
        else:
            counts["frozen_tensors_changed"] += int(moved)
    return counts
