"""voxreg.core.runtime: the allocator settings and releasing memory between stages."""

from __future__ import annotations


def test_memory_is_released_between_stages_only_for_large_registrations():
    """Below the threshold nothing is released (the freed blocks stay for speed); above it
    glibc's malloc_trim hands a freed 400 MB block back to the OS (on Linux)."""
    import sys

    import numpy as np

    from voxreg.core import runtime

    assert runtime.release_memory_above(runtime.RELEASE_ABOVE_VOXELS) is False
    if not sys.platform.startswith("linux"):
        return
    runtime.configure_allocator()

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    block = np.ones(100_000_000, np.float32)  # 400 MB, kept by the allocator once freed
    del block
    before = resident()
    assert runtime.release_memory_above(runtime.RELEASE_ABOVE_VOXELS + 1) is True
    assert resident() < before - 200_000_000
