"""Hand freed heap memory back to the operating system between training steps (glibc's malloc keeps it).

A training step allocates and frees gigabytes of activations in tensors below glibc's mmap threshold (up to
32 MB), which come from the heap; what a step frees stays resident, and the next step's differently-sized batch
fragments it further. On the default reward model the process grew from ~4.7 to ~5.8 GB between its first and
second step of 8 pairs with ~3 GB live; with `malloc_trim` after each step it stayed at the first step's peak
(and the models loaded after training reuse what training gave back instead of stacking on top of it).

The other way round, within a step: glibc serves every allocation above its mmap threshold (logits of a PPO
rollout, 8 x 65 x 49k floats = 100 MB; a packed row's attention scores) with a fresh `mmap` and unmaps it on
free, so the next one of that size is paid again in page faults, and freed heap above 128 KiB at the top is
returned at once. `keep_freed_memory` (every `align` command, at its start) serves them all from the heap and keeps
what is freed until an explicit `release_freed_memory`, which the training stages call after each step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_freed_memory() -> bool:
    """Collect Python garbage, then return the heap's free pages to the OS (glibc `malloc_trim`). True if trimmed
    (False where the C library has no malloc_trim, e.g. musl or macOS: nothing to do there)."""
    gc.collect()
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) is not None)


# mallopt's parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 << 20}


def allocator_set_by_user(environ: dict[str, str]) -> bool:
    """True when the environment already tunes glibc's malloc (GLIBC_TUNABLES glibc.malloc.*, or the older
    MALLOC_* variables such as MALLOC_ARENA_MAX): the user's settings win."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in environ)


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap (no per-allocation mmap) and keep freed memory for reuse instead of
    returning it to the OS at each free (glibc `mallopt`). False, changing nothing, where the C library is not glibc
    or the environment tunes malloc itself (`allocator_set_by_user`)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or allocator_set_by_user(dict(os.environ)):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in KEEP.items())


def release_memory_callback() -> Any:
    """A transformers TrainerCallback that calls `release_freed_memory` after every optimizer step."""
    from transformers import TrainerCallback

    class ReleaseMemory(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            release_freed_memory()

    return ReleaseMemory()


MADV_PAGEOUT = 21  # linux/mman.h (Linux >= 5.4)


def page_out(tensor: Any) -> bool:
    """Ask the kernel to reclaim the pages lying wholly inside `tensor`'s data (madvise MADV_PAGEOUT), for a
    weight that was copied elsewhere and will not be read again (`align.models.prepacked`). Weights loaded from a
    safetensors file are memory-mapped: dropping the tensor leaves its pages resident while the file stays mapped
    (a tied embedding keeps it mapped), so the copy would double the model's memory. Nothing is lost: clean file
    pages are read back from the file if touched again, pages the process changed (a merged adapter) go to swap
    or stay. False where the C library is not glibc (Linux) or the kernel refuses (older than 5.4)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    first, last = -(-start // page) * page, (start + tensor.numel() * tensor.element_size()) // page * page
    if last <= first:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(first, last - first, MADV_PAGEOUT) == 0
