"""The ``voxreg`` command line (typer): thin commands over the lower layers."""

import os

# Before torch is imported: PyTorch's CPU allocator then backs tensors of 2 MB and more with
# transparent huge pages (madvise), where every fresh 4 KB page of the 40-120 MB volumes of a
# 1 mm scan cost a page fault: `voxreg register --engine network` 13.2 -> 12.0 s wall on 2
# cores (benchmarks/results/speed.json). A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from voxreg.cli.app import app, main  # noqa: E402

__all__ = ["app", "main"]
