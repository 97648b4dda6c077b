"""Outputs are written around the page cache (``O_DIRECT``) where the system allows, with the
same bytes as an ordinary write, and fall back to buffered writes where it does not."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from voxreg import io
from voxreg.core.image import Image
from voxreg.io import files

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux only")

SIZES = [0, 1, 4095, 4096, 4097, files.DIRECT_CHUNK - 1, files.DIRECT_CHUNK, files.DIRECT_CHUNK + 5, 9_999_999]


def _write(path: Path, data: bytes, piece: int = 777_777) -> type:
    with files.open_uncached(path) as out:
        kind = type(out)
        for start in range(0, len(data), piece):
            out.write(data[start : start + piece])
    return kind


@pytest.mark.parametrize("size", SIZES)
def test_uncached_file_holds_exactly_the_bytes_written(tmp_path, size):
    data = np.random.default_rng(size).bytes(size)
    kind = _write(tmp_path / "f.bin", data)
    if kind is not files.UncachedFile:
        pytest.skip(f"{tmp_path}: this file system takes no direct writes")
    assert (tmp_path / "f.bin").read_bytes() == data


def test_uncached_file_bypasses_the_page_cache(tmp_path):
    import fcntl

    out = files.open_uncached(tmp_path / "f.bin")
    if not isinstance(out, files.UncachedFile):
        pytest.skip(f"{tmp_path}: this file system takes no direct writes")
    assert fcntl.fcntl(out._fd, fcntl.F_GETFL) & os.O_DIRECT
    out.write(b"abc")
    out.close()
    assert (tmp_path / "f.bin").read_bytes() == b"abc"


def test_a_file_system_without_direct_writes_gets_a_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    data = np.random.default_rng(1).bytes(5_000_000)
    assert _write(tmp_path / "f.bin", data) is not files.UncachedFile
    assert (tmp_path / "f.bin").read_bytes() == data


def test_a_direct_write_refused_midway_continues_buffered(tmp_path, monkeypatch):
    import fcntl

    real_write = os.write
    refused = []

    def refuse_direct_once(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    data = np.random.default_rng(2).bytes(files.DIRECT_CHUNK * 2 + 12_345)
    out = files.open_uncached(tmp_path / "f.bin")
    if not isinstance(out, files.UncachedFile):
        pytest.skip(f"{tmp_path}: this file system takes no direct writes")
    monkeypatch.setattr(os, "write", refuse_direct_once)
    out.write(data)
    out.close()
    assert refused and (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_nifti_written_around_the_cache_reads_back(tmp_path, ext):
    rng = np.random.default_rng(3)
    image = Image(rng.random((37, 41, 29)).astype(np.float32), np.diag([1.2, 0.9, 1.5, 1.0]))
    path = io.save_image(image, tmp_path / f"scan{ext}")
    back = io.load_image(path)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.affine, image.affine)


def test_buffered_writes_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXREG_BUFFERED_WRITES", "1")
    data = b"x" * 10_000
    assert _write(tmp_path / "f.bin", data) is not files.UncachedFile
    assert (tmp_path / "f.bin").read_bytes() == data
