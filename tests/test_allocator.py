"""align keeps freed heap memory for reuse (align/models/memory.py `keep_freed_memory`): once the heap has grown to
a step's allocations, large tensors freed and allocated again cost no new page faults, where glibc's default maps
and unmaps each one every time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from align.models import memory

CYCLES = r"""
import resource
import torch
from align.models.memory import keep_freed_memory
print("kept" if keep_freed_memory() else "default")
torch.set_num_threads(1)
faults = []
for _ in range(12):  # a step's pattern: tensors of 100, 20 and 40 MB (25,000 / 5,000 / 10,000 pages), touched
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(25_000_000), torch.ones(5_000_000)
    del x
    z = torch.ones(10_000_000)
    del y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))
"""


def faults_of_last_cycles(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CYCLES], env=env, capture_output=True, text=True, check=True)
    mode, faults = out.stdout.split()
    return mode, int(faults)


@pytest.mark.skipif(memory._libc() is None or not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    mode, kept = faults_of_last_cycles(env)
    assert mode == "kept" and kept < 1_000  # the heap has grown to the pattern: its pages are reused
    mode, default = faults_of_last_cycles(env | {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"})
    assert mode == "default" and default > 4 * 35_000  # the user's tuning wins: each tensor is mapped afresh


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, False),
    ({"GLIBC_TUNABLES": "glibc.cpu.x=1:glibc.malloc.trim_threshold=0"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"PYTHONMALLOC": "malloc"}, False),
])
def test_the_users_malloc_settings_win(environ, expected):
    assert memory.allocator_set_by_user(environ) is expected


def test_every_align_command_keeps_freed_memory(monkeypatch, tmp_path):
    from align import cli

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["import", "stages/import.yaml", f"output_dir={tmp_path}/x", "nonsense_key=1"]) == 2
    assert calls == [1]


def resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None, reason="glibc on Linux only")
def test_page_out_drops_a_mapped_weights_pages_and_keeps_its_values(tmp_path) -> None:
    """A 64 MiB tensor memory-mapped from a file (as transformers loads safetensors), read, then paged out: its
    resident pages go, and its values (including ones this process changed) are the same when read again."""
    import numpy as np
    import torch

    path = tmp_path / "weights.bin"
    np.arange(16 << 20, dtype=np.float32).tofile(path)
    weight = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private copy-on-write, like safetensors
    weight[:1024] = -1.0  # changed by this process: anonymous pages now
    total = float(weight.double().sum())  # touches every page
    before = resident_mib()
    assert memory.page_out(weight)
    assert before - resident_mib() > 48
    assert float(weight.double().sum()) == total and float(weight[0]) == -1.0 and float(weight[-1]) == (16 << 20) - 1
