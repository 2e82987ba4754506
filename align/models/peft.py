"""PEFT methods: one function per family, chosen by `peft.method`, and how each one saves.

LoRA-family and prompt-learning methods save a PEFT adapter (reloads with `PeftModel.from_pretrained`);
`freeze`, `bitfit` and `full` change base weights and save a full model folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from align.config import opt
from align.errors import ConfigError

Method = Literal["lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                 "freeze", "bitfit", "full"]
ADAPTER_METHODS = {"lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"}
MERGEABLE_METHODS = {"lora", "qlora", "dora", "adalora", "ia3"}


@dataclass(frozen=True)
class PeftSettings:
    method: Method = opt("lora", "lora | qlora (4-bit nf4 base + LoRA) | dora | adalora | ia3 | prompt_tuning | "
                                 "prefix_tuning | p_tuning | freeze (last N blocks) | bitfit (biases) | full")
    r: int = opt(16, "LoRA-family rank (adalora: the target average rank)", ge=1)
    alpha: int = opt(32, "LoRA-family scaling numerator (scale = alpha / r)", ge=1)
    dropout: float = opt(0.05, "dropout on the LoRA-family input", ge=0.0, lt=1.0)
    target_modules: list[str] = opt(["all-linear"], "modules to adapt; 'all-linear' = every linear but the LM head")
    num_virtual_tokens: int = opt(16, "prompt_tuning / prefix_tuning / p_tuning: number of virtual tokens", ge=1)
    freeze_trainable_layers: int = opt(2, "freeze: train only the last N transformer blocks (+ final norm)", ge=1)


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
    else:  # pragma: no cover - Literal type already checked by the config
        raise ConfigError(f"peft.method={m!r} is not a known method")
    return model, what


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
