"""Host (CPU) memory: keep what a training step frees for the next step, instead of giving it back.

A CPU-only setting (``trainer.keep_freed_memory``), applied by the run's entry point
(:func:`segtrain.run.train`) when a run trains on the CPU: on CUDA the activations live in
torch's caching allocator on the GPU and never touch malloc, so it would only raise the
process's resident memory.

A training step allocates and frees the same activation and gradient tensors every step.
glibc's malloc hands freed memory back to the kernel once enough of it sits at the top of
its heap (and serves large blocks straight from mmap), so the next step takes page faults to
get the same memory back, each one zero-filling a fresh 4 KiB page. On the UNet of
``benchmarks/overhead.py`` (CPU, 256x256) that was about 100,000 page faults per 10 steps and
a tenth of the step time; with the two settings below, none.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

# mallopt exists in glibc alone (Linux).
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: glibc's largest allowed M_MMAP_THRESHOLD on 64-bit.
MMAP_THRESHOLD = 32 * 2**20
# Free memory at the top of the heap that may stay in the process: in effect, all of it.
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory rather than return it to the kernel (Linux with glibc).

    Serves blocks up to 32 MiB from the heap (larger ones still come from mmap) and never
    trims the heap: the process keeps its peak memory, which a training loop needs again at
    every step anyway. Applies to this process and to DataLoader workers forked from it.
    Returns whether the settings were applied (False on other systems and C libraries).
    """
    if not GLIBC:
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # Setting either parameter turns off glibc's dynamic thresholds, so both are set together:
    # a fixed trim threshold alone would leave the mmap threshold at 128 KiB (far more faults).
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


_applied = False  # once per process


def keep_freed_memory_for_cpu_training(device_type: str, enabled: bool) -> bool:
    """``trainer.keep_freed_memory``: applied for a run that trains on the CPU, logged once per process."""
    global _applied
    if not enabled or device_type != "cpu":
        return False
    if not _applied and keep_freed_memory():
        _applied = True
        log.info(
            "host memory (CPU training): malloc keeps freed memory for the next step instead of returning it to the "
            "OS (trainer.keep_freed_memory=true; false restores glibc's defaults)"
        )
    return _applied

