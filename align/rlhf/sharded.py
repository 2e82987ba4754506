"""Whole parameters from a sharded model (FSDP, DeepSpeed ZeRO-3), for the moments PPO needs them whole.

Under FSDP and ZeRO-3 each process holds a shard of every parameter (under ZeRO-2, of the optimizer state). PPO
reads whole trained weights in three places: the refresh of the rollout sampler (a copy or a vLLM engine), the
trainable state of a checkpoint, and the final model. `full_parameters` gathers them; a gather is a collective, so
EVERY process enters it, in the same order (a gather on the main process alone waits forever). The optimizer
state of a sharded launch goes through accelerate's own `save_state` / `load_state` (FSDP's full or sharded state
dict as the launch config says, DeepSpeed's engine checkpoint), which every process calls too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from torch import Tensor, nn

Sharding = Literal["", "fsdp1", "fsdp2", "zero2", "zero3"]  # "": every process holds everything (1 process, DDP)
# Module names that wrappers insert: FSDP1's unit wrapper, activation checkpointing, torch.compile.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def sharding(acc: Any) -> Sharding:
    """How the launch splits the model over processes, from the accelerate.Accelerator."""
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    if kind == "FSDP":
        return "fsdp2" if getattr(acc, "is_fsdp2", False) else "fsdp1"
    if kind == "DEEPSPEED":
        return "zero3" if acc.state.deepspeed_plugin.zero_stage == 3 else "zero2"
    return ""


def shards_parameters(kind: Sharding) -> bool:
    return kind in ("fsdp1", "fsdp2", "zero3")


@contextlib.contextmanager
def full_parameters(model: nn.Module, kind: Sharding) -> Iterator[None]:
    """Every parameter of `model` (the prepared, wrapped model) whole on this process for the block, read only.
    Call it on every process at the same point: FSDP1 `summon_full_params`, FSDP2 `unshard` of every unit,
    ZeRO-3 `GatheredParameters`; nothing to do when parameters are not sharded."""
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield
    elif kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the same order on every process
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in reversed(units):
                unit.reshard()
    elif kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def plain_name(name: str) -> str:
    """A parameter or module name without the parts wrappers insert (as the unwrapped model names it)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def gathered_trainable_state(model: nn.Module, unwrapped: nn.Module, kind: Sharding) -> dict[str, Tensor]:
    """Every trainable parameter of `unwrapped` by its plain name, whole and on the CPU, gathered from the shards
    (every process calls this; each gets the full state)."""
    with full_parameters(model, kind):
        return {plain_name(n): p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}


def fill_deepspeed_auto(acc: Any, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed wants its micro batch size before `prepare`; the shipped zero configs leave it and the clipping
    norm "auto", which accelerate fills from a prepared dataloader (PPO has none) and with 1.0: fill them from the
    recipe (ppo.mini_batch_size, ppo.max_grad_norm)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_clipping", max_grad_norm)):
        if plugin.deepspeed_config.get(key, "auto") == "auto":
            plugin.deepspeed_config[key] = value
