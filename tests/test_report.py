"""Tests of voxreg.report: the PNG, its orientation logic and the deformed-grid helper."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from voxreg.core.errors import VoxregError
from voxreg.viz import registration_figure as report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    fixed = rng.random(shape, dtype=np.float32)
    moving = np.roll(fixed, 1, axis=0)
    field = 0.5 * rng.standard_normal((len(shape), *shape)).astype(np.float32)
    return fixed, moving, field


def test_figure_3d_is_a_png(tmp_path):
    fixed, moving, field = _inputs((20, 24, 18))
    out = report.registration_figure(
        fixed, moving, fixed, field, tmp_path / "sub" / "fig.png", title="test", spacing=(1.0, 1.0, 2.0)
    )
    assert out == tmp_path / "sub" / "fig.png" and out.is_file()
    width, height = _png_size(out)
    assert 600 < width < 3000 and 300 < height < 2000
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # no temporary left behind


def test_figure_2d_with_tensor_field(tmp_path):
    fixed, moving, field = _inputs((24, 30))
    out = report.registration_figure(fixed, moving, moving, torch.from_numpy(field)[None], tmp_path / "f.png")
    width, height = _png_size(out)
    assert width > height > 100


def test_figure_rejects_bad_shapes(tmp_path):
    fixed, moving, field = _inputs((12, 14))
    with pytest.raises(VoxregError, match="moving"):
        report.registration_figure(fixed, moving[:-1], fixed, field, tmp_path / "f.png")
    with pytest.raises(VoxregError, match="field"):
        report.registration_figure(fixed, moving, fixed, field[:1], tmp_path / "f.png")
    assert not any(tmp_path.iterdir())


def test_grid_lines_zero_field_are_straight():
    zero = np.zeros((10, 7), dtype=np.float32)
    along_h, along_v = report.grid_lines(zero, zero, step=3)
    assert along_h.shape == (3, 10, 2) and along_v.shape == (4, 7, 2)
    for k, line in enumerate(along_h):
        np.testing.assert_array_equal(line[:, 0], np.arange(10))
        np.testing.assert_array_equal(line[:, 1], 3 * k)
    for k, line in enumerate(along_v):
        np.testing.assert_array_equal(line[:, 0], 3 * k)
        np.testing.assert_array_equal(line[:, 1], np.arange(7))


def test_grid_lines_constant_shift():
    zero = np.zeros((10, 7), dtype=np.float32)
    shifted_h, shifted_v = report.grid_lines(zero + 2.0, zero, step=3)
    ref_h, ref_v = report.grid_lines(zero, zero, step=3)
    np.testing.assert_array_equal(shifted_h[..., 0], ref_h[..., 0] + 2)
    np.testing.assert_array_equal(shifted_h[..., 1], ref_h[..., 1])
    np.testing.assert_array_equal(shifted_v[..., 0], ref_v[..., 0] + 2)


def test_shift_along_axis0_moves_axial_lines_horizontally():
    field = np.zeros((3, 9, 10, 11), dtype=np.float32)
    field[0] = 2.0
    axial = report.display_planes((9, 10, 11))[0]
    assert (axial.axis, axial.horizontal, axial.vertical) == (2, 0, 1)
    lines, _ = report.grid_lines(
        report._cut(field[axial.horizontal], axial), report._cut(field[axial.vertical], axial), step=4
    )
    np.testing.assert_array_equal(lines[0][:, 0], np.arange(9) + 2)


def _displayed(array: np.ndarray, plane) -> np.ndarray:
    shown = report._cut(array, plane)
    return shown[:: -1 if plane.flip_h else 1, :: -1 if plane.flip_v else 1]


def test_orientation_independent_display():
    """An LIA copy of an RAS volume is displayed exactly like the RAS original."""
    ras = np.random.default_rng(0).random((9, 11, 13), dtype=np.float32)
    ras_affine = np.diag([1.0, 2.0, 3.0, 1.0])
    lia = np.ascontiguousarray(ras[::-1].transpose(0, 2, 1)[:, ::-1])  # axes: L, I, A
    lia_affine = np.array([[-1, 0, 0, 8], [0, 0, 2, 0], [0, -3, 0, 36], [0, 0, 0, 1.0]])
    planes_ras = report.display_planes(ras.shape, ras_affine)
    planes_lia = report.display_planes(lia.shape, lia_affine)
    assert [p.name.split()[0] for p in planes_lia] == ["axial", "coronal", "sagittal"]
    for p_ras, p_lia in zip(planes_ras, planes_lia):
        np.testing.assert_array_equal(_displayed(ras, p_ras), _displayed(lia, p_lia))
