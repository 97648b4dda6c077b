"""Process-level tuning for large-volume work on CPU.

glibc returns large freed blocks to the OS and maps them again on the next allocation,
so every iteration of an optimisation on a 160x192x224 volume pays page faults for each
temporary tensor (measured: 3.6 s -> 1.7 s per full-resolution iteration on 2 cores).
:func:`configure_allocator` keeps freed memory in the process instead, and makes threads
started after it share the main heap (a thread's own arena maps and unmaps every large block
afresh). It is applied once, on Linux/glibc only, and can be disabled with ``VOXREG_NO_MALLOPT=1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from voxreg.core.errors import VoxregError

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_configured = False


def configure_allocator() -> bool:
    """Keep large freed blocks inside the process (glibc ``mallopt``); True when applied."""
    global _configured
    if _configured or not sys.platform.startswith("linux") or os.environ.get("VOXREG_NO_MALLOPT"):
        return _configured
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int((1 << 31) - 1))
        libc.mallopt(_M_TOP_PAD, ctypes.c_int(1 << 28))
        # threads started from now on (reading ahead, writing behind) allocate from the main
        # heap too: a thread's own arena serves blocks above its 64 MB heaps by mmap, freed
        # back to the OS and faulted in again for every volume (register-batch, 3 Mindboggle
        # pairs: 1.6 M -> 0.65 M page faults, peak 3.4 -> 2.6 GB, 21.7-25.5 -> 18.3-21.2 s)
        libc.mallopt(_M_ARENA_MAX, ctypes.c_int(1))
        _configured = True
    except (OSError, AttributeError):
        _configured = False
    return _configured


def release_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), e.g. before measuring
    the peak memory of one step; True when done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (every field a ``size_t``)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (2.33 and later), or None (another C library or platform)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


def heap_in_use_mb() -> float | None:
    """MB that malloc has handed out and not taken back (heap chunks in use and mmapped
    blocks, every arena: glibc ``mallinfo2``), None where that count is not available. Unlike
    the resident set it does not count freed blocks the allocator keeps
    (:func:`configure_allocator`), so it measures a step's memory without
    :func:`release_memory` first."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return float(info.uordblks + info.hblkhd) / 2**20


#: a registration of more voxels than this hands freed memory back to the OS between stages
RELEASE_ABOVE_VOXELS = 16_000_000


def release_memory_above(voxels: int, threshold: int = RELEASE_ABOVE_VOXELS) -> bool:
    """Between two stages of a registration of ``voxels`` voxels, :func:`release_memory` when
    they are more than ``threshold``: the allocator keeps freed blocks for speed
    (:func:`configure_allocator`) and across stages those add up (a 1.4 mm CT pair: 0.6 GB
    kept after the affine stage alone). Smaller images keep them, since faulting the pages
    in again costs more time than the memory is worth. True when memory was released."""
    return int(voxels) > threshold and release_memory()


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (None or 0: unchanged) and the
    caller's setting restored after it. Threads that start their first parallel torch operation
    inside the block take ``count`` too (torch initialises a thread's pool from the last
    setting): jobs run side by side on their own threads each get one core's worth instead of
    every job asking for all the cores (OpenMP teams oversubscribing a small machine)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(previous)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> CUDA when available else CPU; ``'cuda'`` without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VoxregError(
            f"device {name!r} requested but CUDA is not available on this machine (use --device cpu or auto)"
        )
    if not (name == "cpu" or name.startswith("cuda")):
        raise VoxregError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


#: ``VOXREG_NETWORK_PRECISION``: ``auto`` (default), ``float32`` or ``bfloat16``
PRECISION_VARIABLE = "VOXREG_NETWORK_PRECISION"
#: where Linux lists the CPU's instruction-set flags
CPUINFO = "/proc/cpuinfo"


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bfloat16 convolutions natively: a CUDA GPU that supports
    bf16, or a CPU with AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo`` flags; elsewhere
    False, since emulated bf16 is slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool(_cpu_flags(CPUINFO) & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=4)
def _cpu_flags(path: str) -> frozenset[str]:
    """The instruction-set flags of the first CPU listed in ``path`` (read once per process;
    empty where the file is missing, e.g. not Linux)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def network_precision(device: torch.device) -> str:
    """How a network runs its convolutions at inference: ``'bfloat16'`` (autocast; measured on
    the 8 held-out Mindboggle pairs: the same Dice to 0.0002 and the U-Net ~1.7x faster on a
    2-core AVX512-BF16 CPU) where :func:`native_bf16`, else ``'float32'``;
    ``VOXREG_NETWORK_PRECISION=float32`` (or ``bfloat16``) overrides the choice."""
    asked = os.environ.get(PRECISION_VARIABLE, "auto").strip().lower() or "auto"
    if asked not in ("auto", "float32", "bfloat16"):
        raise VoxregError(f"{PRECISION_VARIABLE}={asked!r}: use auto, float32 or bfloat16")
    if asked != "auto":
        return asked
    return "bfloat16" if native_bf16(device) else "float32"
