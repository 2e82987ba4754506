"""Resumable PPO checkpoints, written atomically.

`checkpoints/step-N/` holds: trainable.safetensors (every trainable tensor: the LoRA adapter and the value head or
critic adapter), optimizer.safetensors + optimizer.json (the optimizer's tensors, and its plain numbers and param
groups), rng-<rank>.json (python/numpy/torch RNG states of each process), state.json (step, KL controller, reward
normaliser) and, for adapter methods, policy/ (the adapter alone, loadable with PEFT). Nothing is pickled, so a
crafted checkpoint in a shared run folder cannot run code on `resume=true`. A sharded launch (FSDP, DeepSpeed ZeRO)
keeps the model and optimizer state in accelerate/ instead, written by accelerate's `save_state` on every process
(its files are torch/DeepSpeed checkpoints: accelerate reads its own with `weights_only=True`).
Everything is written into a hidden temporary folder that is renamed into place only when complete, so a run
killed mid-save leaves the previous checkpoint as the newest one; align-files.json records every file's size and
sha256, so a checkpoint that rots afterwards is skipped on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"
ACCELERATE_STATE = "accelerate"  # accelerate.save_state's folder in a checkpoint of a sharded launch


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step whose files match their record (see `runs.record_files`;
    a damaged newer one is skipped, saying so), or None. An AlignError when every checkpoint is damaged."""
    from align.runs import newest_sound_checkpoint

    found = [p for p in checkpoint_dir(run_dir).glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]
    return newest_sound_checkpoint(found, lambda p: int(p.name[len(PREFIX):]))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain JSON data."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_optimizer(optimizer_state: dict[str, Any], folder: Path) -> None:
    """An optimizer state_dict as optimizer.safetensors (its tensors) + optimizer.json (everything else)."""
    from safetensors.torch import save_file

    tensors, numbers = {}, {}
    for pid, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                numbers[f"{pid}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"numbers": numbers,
                                                      "param_groups": optimizer_state["param_groups"]}))


def load_optimizer(folder: Path) -> dict[str, Any]:
    """The inverse of `save_optimizer`: a state_dict for `optimizer.load_state_dict`."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(folder / "optimizer.safetensors")).items(), *meta["numbers"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer: Any | None,
                    state: dict[str, Any], rank: int, world: int, is_main: bool,
                    barrier: Callable[[], None], save_policy: Callable[[Path], None] | None, keep: int,
                    save_state: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` (every process calls this; process 0 writes the shared files and renames).
    `save_state`: called on every process with the checkpoint's accelerate/ folder (sharded launches; then
    `optimizer` is None: its state is in there)."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step}"
    tmp = checkpoint_dir(run_dir) / f".tmp-{PREFIX}{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_state()))
    if save_state is not None:
        save_state(tmp / ACCELERATE_STATE)
    if is_main:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            save_optimizer(optimizer.state_dict(), tmp)
        if save_policy is not None:
            save_policy(tmp / "policy")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world, **state}, indent=2))
    barrier()
    if is_main:
        from align.runs import record_files

        record_files(tmp)  # every process's files are in: record sizes and hashes, so rot is found on resume
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in sorted(checkpoint_dir(run_dir).glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """{'trainable', 'optimizer' (None when accelerate/ holds it), 'state', 'rng' (None when this rank saved none)}
    of a checkpoint folder."""
    from safetensors.torch import load_file

    rng_file = path / f"rng-{rank}.json"
    return {"trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": load_optimizer(path) if (path / "optimizer.json").is_file() else None,
            "state": json.loads((path / "state.json").read_text()),
            "rng": json.loads(rng_file.read_text()) if rng_file.is_file() else None}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
