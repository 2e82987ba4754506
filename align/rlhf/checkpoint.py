"""Resumable PPO checkpoints, written atomically.

`checkpoints/step-N/` holds: trainable.pt (every trainable tensor: the LoRA adapter and the value head or critic
adapter), optimizer.pt, rng-<rank>.pt (python/numpy/torch RNG states of each process), state.json (step, KL
controller, reward normaliser) and, for adapter methods, policy/ (the adapter alone, loadable with PEFT).
Everything is written into a hidden temporary folder that is renamed into place only when complete, so a run
killed mid-save leaves the previous checkpoint as the newest one.
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


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = [p for p in checkpoint_dir(run_dir).glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]
    return max(found, key=lambda p: int(p.name[len(PREFIX):]), default=None)


def rng_state() -> dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer: Any,
                    state: dict[str, Any], rank: int, world: int, is_main: bool,
                    barrier: Callable[[], None], save_policy: Callable[[Path], None] | None, keep: int) -> Path:
    """Write checkpoint `step` (every process calls this; process 0 writes the shared files and renames)."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step}"
    tmp = checkpoint_dir(run_dir) / f".tmp-{PREFIX}{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if is_main:
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if save_policy is not None:
            save_policy(tmp / "policy")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world, **state}, indent=2))
    barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in sorted(checkpoint_dir(run_dir).glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """{'trainable', 'optimizer', 'state', 'rng' (None when this rank saved none)} of a checkpoint folder."""
    rng_file = path / f"rng-{rank}.pt"
    return {"trainable": torch.load(path / "trainable.pt", map_location="cpu"),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
            "state": json.loads((path / "state.json").read_text()),
            "rng": torch.load(rng_file, weights_only=False) if rng_file.is_file() else None}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
