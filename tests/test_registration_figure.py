"""Pixel content of figure.png (voxreg.viz.registration_figure): panel placement and
orientation, the deformed grid and folding marks, the colour bars and the PNG size."""

from __future__ import annotations

import numpy as np
import pytest

from voxreg.viz import registration_figure as report

PIL = pytest.importorskip("PIL.Image")


def _pixels(path) -> np.ndarray:
    with PIL.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _figure(tmp_path, fixed, moving=None, warped=None, field=None, name="f.png", **kwargs):
    moving = fixed if moving is None else moving
    warped = fixed if warped is None else warped
    field = np.zeros((fixed.ndim, *fixed.shape), np.float32) if field is None else field
    out = report.registration_figure(fixed, moving, warped, field, tmp_path / name, **kwargs)
    return _pixels(out)


def _layout(shape, spacing=None, affine=None, title="", dpi=110):
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    return report._layout(shape, spacing, report.display_planes(shape, affine), title, dpi)


def _region(pixels, panel, column):
    left = panel.lefts[column]
    return pixels[panel.top : panel.top + panel.height, left : left + panel.width]


def test_png_size_is_the_layout(tmp_path):
    fixed = np.random.default_rng(0).random((20, 24, 18), dtype=np.float32)
    pixels = _figure(tmp_path, fixed, title="t", spacing=(1.0, 1.0, 2.0))
    _, (height, width) = _layout(fixed.shape, (1.0, 1.0, 2.0), title="t")
    assert pixels.shape == (height, width, 3)
    assert _figure(tmp_path, fixed, dpi=55, name="small.png").shape[1] < width * 0.6


def test_2d_panels_show_the_slices_in_display_orientation(tmp_path):
    """Axis 0 runs left -> right, axis 1 bottom -> top; moving and warped are their own images."""
    fixed = np.zeros((40, 30), np.float32)
    fixed[:20, 15:] = 1.0  # small h, large v: top-left quarter
    moving = np.zeros_like(fixed)
    moving[20:, :15] = 1.0  # bottom-right quarter
    pixels = _figure(tmp_path, fixed, moving=moving, title="2D")
    (panel,), _ = _layout(fixed.shape, title="2D")
    assert panel.width > panel.height  # 40 x 30 voxels of 1 mm
    for column, bright in ((0, "top-left"), (1, "bottom-right"), (2, "top-left")):
        image = _region(pixels, panel, column).mean(axis=-1)
        half_h, half_w = panel.height // 2, panel.width // 2
        quarters = {
            "top-left": image[: half_h - 2, : half_w - 2],
            "top-right": image[: half_h - 2, half_w + 2 :],
            "bottom-left": image[half_h + 2 :, : half_w - 2],
            "bottom-right": image[half_h + 2 :, half_w + 2 :],
        }
        for name, quarter in quarters.items():
            assert (quarter.min() > 240) if name == bright else (quarter.max() < 15), (column, name)
    # difference panel (warped - fixed = 0): the middle colour of RdBu_r, everywhere above
    # the MAE label
    diff = _region(pixels, panel, 3)[5 : int(0.7 * panel.height), 5:-5]
    assert np.ptp(diff.reshape(-1, 3), axis=0).max() <= 2


def test_fixed_panel_of_a_brain_like_volume_is_not_blank(tmp_path):
    rng = np.random.default_rng(1)
    fixed = rng.random((24, 26, 20), dtype=np.float32)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    pixels = _figure(tmp_path, fixed, title="x", affine=affine)
    panels, _ = _layout(fixed.shape, (1.0, 1.0, 1.5), affine, title="x")
    assert len(panels) == 3
    for panel in panels:
        image = _region(pixels, panel, 0)
        assert image.std() > 30  # textured, not blank
        assert (image[..., 0] == image[..., 1]).all()  # grey


def test_orientation_is_the_same_for_an_lia_copy(tmp_path):
    ras = np.random.default_rng(0).random((15, 17, 19), dtype=np.float32)  # odd: same mid-slices
    ras_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    lia = np.ascontiguousarray(ras[::-1].transpose(0, 2, 1)[:, ::-1])
    lia_affine = np.array([[-1, 0, 0, 15], [0, 0, 1, 0], [0, -1, 0, 19], [0, 0, 0, 1.0]])
    moving = np.roll(ras, 2, axis=1)
    moving_lia = np.ascontiguousarray(moving[::-1].transpose(0, 2, 1)[:, ::-1])
    a = _figure(tmp_path, ras, moving=moving, affine=ras_affine, name="ras.png")
    b = _figure(tmp_path, lia, moving=moving_lia, affine=lia_affine, name="lia.png")
    panels_a, size_a = _layout(ras.shape, affine=ras_affine)
    panels_b, size_b = _layout(lia.shape, affine=lia_affine)
    assert size_a == size_b
    for pa, pb in zip(panels_a, panels_b):
        for column in range(4):
            np.testing.assert_array_equal(_region(a, pa, column)[:-20], _region(b, pb, column)[:-20])


def _grid_columns(pixels, panel):
    """Mosaic columns where a vertical grid line darkens the det(J) panel."""
    image = _region(pixels, panel, 4)[panel.height // 4 : 3 * panel.height // 4, 2:-2].mean(axis=-1)
    profile = image.mean(axis=0)
    return np.flatnonzero(profile < profile.max() - 40) + panel.lefts[4] + 2


def test_grid_lines_follow_the_field(tmp_path):
    shape = (48, 40)
    fixed = np.full(shape, 0.5, np.float32)
    zero = np.zeros((2, *shape), np.float32)
    shifted = zero.copy()
    shifted[0] = 2.0  # every fixed point samples 2 voxels further along axis 0
    (panel,), _ = _layout(shape)
    scale = panel.width / shape[0]
    straight = _grid_columns(_figure(tmp_path, fixed, field=zero, grid_step=8, name="zero.png"), panel)
    moved = _grid_columns(_figure(tmp_path, fixed, field=shifted, grid_step=8, name="shift.png"), panel)
    expected = panel.to_pixels(np.array([[h, 0.0] for h in range(8, 48, 8)]), 4)[:, 0]
    for x in expected:  # straight lines at x = k * step
        assert np.abs(straight - x).min() <= 1.0
        assert np.abs(moved - x).min() > 1.5 * scale - 1  # ... not where the moved ones are
    for x in expected + 2 * scale:  # moved right by the displacement
        assert np.abs(moved - x).min() <= 1.0


def test_folding_is_outlined(tmp_path):
    shape = (32, 32)
    fixed = np.random.default_rng(0).random(shape, dtype=np.float32)
    field = np.zeros((2, *shape), np.float32)
    (panel,), _ = _layout(shape)
    lime = np.array(report._FOLD_COLOUR)

    def lime_pixels(pixels):
        return int((np.abs(_region(pixels, panel, 4) - lime).sum(axis=-1) == 0).sum())

    assert lime_pixels(_figure(tmp_path, fixed, field=field, name="ok.png")) == 0
    field[0, 8:24] = -2.0 * np.arange(16, dtype=np.float32)[:, None]  # d u0 / d h = -2: det < 0
    assert lime_pixels(_figure(tmp_path, fixed, field=field, name="fold.png")) > 20


def test_jacobian_slice_matches_the_full_volume():
    import torch

    from voxreg.core import spatial

    rng = np.random.default_rng(0)
    field = rng.standard_normal((3, 9, 10, 11)).astype(np.float32)
    full = spatial.jacobian_determinant(torch.from_numpy(field)[None])[0].numpy()
    affine = np.array([[0, 0, -1, 8], [1, 0, 0, 0], [0, -2, 0, 3], [0, 0, 0, 1.0]])
    for plane in report.display_planes(field.shape[1:], affine):
        for index in (0, plane.index, field.shape[1 + plane.axis] - 1):
            cut = report.DisplayPlane(plane.axis, index, plane.horizontal, plane.vertical)
            np.testing.assert_allclose(report._jacobian_slice(field, cut), report._cut(full, cut), atol=1e-5)


def test_stored_colormaps_are_matplotlibs():
    from matplotlib import colormaps

    for name in ("gray", "RdBu_r", "coolwarm"):
        report._LUTS.pop(name, None)
        expected = colormaps[name](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
        np.testing.assert_array_equal(report._lut(name), expected)


def test_colour_bar_ticks_are_matplotlibs_max_n_locator():
    from matplotlib.ticker import MaxNLocator

    rng = np.random.default_rng(0)
    spans = np.concatenate([10 ** rng.uniform(-6, 6, 300), [1e-6, 0.5, 1.0, 2.0, 3.0, 7.3, 1600.0]])
    ranges = [(0.0, 2.0), *((-d, d) for d in spans), *(tuple(sorted(rng.uniform(-50, 50, 2))) for _ in range(300))]
    for low, high in ranges:
        if abs(low + high) / 2 >= 100 * (high - low):  # matplotlib then offsets; no colour bar of ours is so
            continue
        np.testing.assert_allclose(report.nice_ticks(low, high), MaxNLocator(5).tick_values(low, high), rtol=1e-9)
    np.testing.assert_allclose(report.nice_ticks(0.0, 2.0), [0.0, 0.4, 0.8, 1.2, 1.6, 2.0])
    np.testing.assert_allclose(report.nice_ticks(-1600.0, 1600.0), [-1600.0, -800.0, 0.0, 800.0, 1600.0])


def test_the_figure_does_not_import_matplotlib(tmp_path):
    """Drawing figure.png leaves matplotlib out (its import and first draw cost ~0.4 s of a
    fresh `voxreg register`); the text still comes out in the panels' titles."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from voxreg.viz.registration_figure import registration_figure\n"
        "a = np.random.default_rng(0).random((20, 24, 18), dtype=np.float32)\n"
        f"registration_figure(a, a, a, np.zeros((3, 20, 24, 18), np.float32), {str(tmp_path / 'f.png')!r}, title='t')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace", check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    pixels = _pixels(tmp_path / "f.png")
    panels, _ = _layout((20, 24, 18), title="t")
    heading = pixels[: panels[0].top - 2, panels[0].lefts[0] : panels[0].lefts[0] + panels[0].width]
    assert (heading.sum(axis=-1) < 300).sum() > 20  # dark text pixels of the column title "fixed"
