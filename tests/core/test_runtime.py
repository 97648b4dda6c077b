"""voxreg.core.runtime: the allocator settings and releasing memory between stages."""

from __future__ import annotations

import numpy as np
import torch


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


_THREADS_SHARE_THE_MAIN_HEAP = """
import resource, sys, threading
import torch
from voxreg.core import runtime
if not runtime.configure_allocator():
    print("not applied")
    sys.exit(0)
faults = []
def allocate_and_touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(25_000_000)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(3):
    thread = threading.Thread(target=allocate_and_touch)
    thread.start()
    thread.join()
print(*faults)
"""


def test_threads_reuse_the_freed_blocks_of_the_main_heap():
    """After configure_allocator a thread's 100 MB tensor comes from the main heap: freed, the
    next thread's same-sized tensor reuses those pages (no new page faults). A thread arena of
    its own would map a fresh block (~25 000 faults) for every such tensor.

    Run in a fresh interpreter: arenas that threads created before the settings (earlier tests
    in this process) are still handed out to new threads, which made the check depend on the
    order of the tests."""
    import os
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc allocator settings apply on Linux only")
    env = {key: value for key, value in os.environ.items() if key != "VOXREG_NO_MALLOPT"}
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_SHARE_THE_MAIN_HEAP],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "not applied":
        pytest.skip("glibc mallopt is not available here")
    faults = [int(value) for value in done.stdout.split()]
    assert len(faults) == 3 and faults[0] > 20_000, faults  # the first thread faults its block in
    assert min(faults[1:]) < 2_000, faults


def test_the_network_runs_in_bfloat16_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    """``network_precision``: bfloat16 on a CPU whose flags list avx512_bf16 or amx_bf16,
    float32 on one without (emulated bf16 is slower) or without /proc/cpuinfo;
    VOXREG_NETWORK_PRECISION overrides the choice, and a wrong value is refused in one line."""
    import pytest
    import torch

    from voxreg.core import runtime
    from voxreg.core.errors import VoxregError

    cpu = torch.device("cpu")
    monkeypatch.delenv(runtime.PRECISION_VARIABLE, raising=False)
    for flags, expected in (
        ("fpu avx2 avx512f avx512_bf16", "bfloat16"),
        ("fpu amx_bf16 amx_tile", "bfloat16"),
        ("fpu avx2 avx512f avx512bw", "float32"),
    ):
        info = tmp_path / f"cpuinfo-{expected}-{len(flags)}"  # one file each: the flags are read once per path
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        monkeypatch.setattr(runtime, "CPUINFO", str(info))
        assert runtime.network_precision(cpu) == expected
    monkeypatch.setattr(runtime, "CPUINFO", str(tmp_path / "missing"))
    assert runtime.native_bf16(cpu) is False and runtime.network_precision(cpu) == "float32"
    monkeypatch.setenv(runtime.PRECISION_VARIABLE, "bfloat16")
    assert runtime.network_precision(cpu) == "bfloat16"
    monkeypatch.setattr(runtime, "CPUINFO", str(info))
    monkeypatch.setenv(runtime.PRECISION_VARIABLE, " Float32 ")
    assert runtime.network_precision(cpu) == "float32"
    monkeypatch.setenv(runtime.PRECISION_VARIABLE, "half")
    with pytest.raises(VoxregError, match="VOXREG_NETWORK_PRECISION='half': use auto, float32 or bfloat16"):
        runtime.network_precision(cpu)


def test_torch_threads_sets_the_block_and_threads_started_in_it_then_restores():
    from concurrent.futures import ThreadPoolExecutor

    from voxreg.core.runtime import torch_threads

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            with ThreadPoolExecutor(1) as pool:  # a job's thread takes the block's setting
                assert pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
        with torch_threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_the_output_jobs_run_on_one_torch_thread_each(tmp_path, monkeypatch):
    """write_outputs runs the metrics beside the inverse and the writes with one torch thread
    per job, and gives the caller its threads back."""
    from voxreg.core.image import Image
    from voxreg.core.synthetic import smooth_random_field
    from voxreg.registration import outputs, pipeline

    image = torch.rand(1, 1, 24, 20, 16, generator=torch.Generator().manual_seed(0))[0, 0].numpy()
    fixed = Image(image, np.eye(4))
    moving = Image(np.roll(image, 1, axis=0), np.eye(4))
    result = pipeline.register(fixed, moving, engine="instance", affine=False, defer_metrics=True, device="cpu")
    result.field = torch.as_tensor(smooth_random_field((24, 20, 16), max_displacement=1.0, seed=1))
    seen = []
    finish = result.finish_metrics

    def spy():
        seen.append(torch.get_num_threads())
        return finish()

    monkeypatch.setattr(result, "finish_metrics", spy)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outputs.write_outputs(result, tmp_path, figure=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen == [1] and (tmp_path / "metrics.json").exists()
