"""Tests for voxreg.metrics: hand-computable Dice, folding, log-Jacobian, EPE, report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxreg import metrics as M


def _cubes():
    fixed = np.zeros((16, 16, 16), dtype=np.int32)
    warped = np.zeros_like(fixed)
    fixed[4:12, 4:12, 4:12] = 1
    warped[8:16, 4:12, 4:12] = 1  # shifted by half the cube: 256 of 512 voxels shared
    return fixed, warped


def test_dice_cubes_overlapping_by_half():
    fixed, warped = _cubes()
    assert M.dice_per_label(fixed, warped) == {1: 0.5}
    assert M.dice_per_label(fixed, fixed) == {1: 1.0}
    assert M.dice_per_label(torch.from_numpy(fixed), torch.from_numpy(warped)) == {1: 0.5}


def test_dice_default_and_requested_labels():
    fixed, warped = _cubes()
    fixed[0, 0, :4] = 2  # label 2 only in fixed
    fixed[1, 1, :2] = 3
    warped[1, 1, :2] = 3
    assert M.dice_per_label(fixed, warped) == {1: 0.5, 3: 1.0}
    result = M.dice_per_label(fixed, warped, labels=[0, 1, 2, 7])
    assert result[1] == 0.5 and result[2] == 0.0 and 0 < result[0] < 1
    assert math.isnan(result[7])


def test_dice_large_and_negative_labels_and_floats():
    fixed, warped = _cubes()
    big_f = np.where(fixed == 1, 50_000_000, -4).astype(np.int64)
    big_w = np.where(warped == 1, 50_000_000, -4).astype(np.int64)
    assert M.dice_per_label(big_f, big_w) == {-4: pytest.approx(2 * (4096 - 768) / (2 * (4096 - 512))), 50_000_000: 0.5}
    assert M.dice_per_label(fixed.astype(np.float32), warped.astype(np.float32)) == {1: 0.5}
    with pytest.raises(ValueError, match="shape"):
        M.dice_per_label(fixed, warped[:-1])


def test_jacobian_stats_zero_field():
    stats = M.jacobian_stats(torch.zeros(1, 3, 6, 7, 8))
    assert stats["folding_percent"] == 0.0
    assert stats["log_jacobian_std"] == 0.0
    assert stats["jacobian_min"] == stats["jacobian_max"] == 1.0


@pytest.mark.parametrize("shape", [(10, 12), (6, 12, 5)])
def test_jacobian_stats_known_folding(shape):
    ndim = len(shape)
    field = np.zeros((ndim, *shape), dtype=np.float32)
    x0 = np.arange(shape[0], dtype=np.float32).reshape(-1, *([1] * (ndim - 1)))
    field[0] = np.broadcast_to(x0, shape)  # u_0 = x_0: det = 2 ...
    field[0][:, :3] *= -2  # ... except u_0 = -2 x_0 (det = -1) where x_1 < 3
    stats = M.jacobian_stats(field)
    assert stats["folding_percent"] == pytest.approx(100 * 3 / shape[1])
    assert stats["jacobian_min"] == pytest.approx(-1.0) and stats["jacobian_max"] == pytest.approx(2.0)
    mask = np.zeros(shape, dtype=bool)
    mask[:, 3:] = True  # only det = 2: no folding, constant log
    masked = M.jacobian_stats(field[None], mask=mask)
    assert masked["folding_percent"] == 0.0 and masked["log_jacobian_std"] == pytest.approx(0.0, abs=1e-7)


def test_log_jacobian_std_of_two_volumes():
    field = torch.zeros(1, 2, 8, 10)
    field[0, 0, :, :5] = torch.arange(8.0)[:, None]  # det 2 on half the voxels, 1 elsewhere
    stats = M.jacobian_stats(field)
    assert stats["log_jacobian_std"] == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert stats["jacobian_mean"] == pytest.approx(1.5)


def test_jacobian_stats_rejects_bad_shapes():
    with pytest.raises(ValueError, match="field"):
        M.jacobian_stats(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="mask"):
        M.jacobian_stats(np.zeros((2, 4, 5)), mask=np.ones((4, 4), bool))


def test_endpoint_error():
    a = torch.zeros(1, 2, 4, 5)
    b = torch.zeros(1, 2, 4, 5)
    b[0, 0], b[0, 1] = 3.0, 4.0
    assert M.endpoint_error(a, b) == pytest.approx(5.0)
    mask = np.zeros((4, 5), bool)
    mask[0] = True
    b[0, :, 1:] = 0
    assert M.endpoint_error(a.numpy(), b.numpy(), mask=mask) == pytest.approx(5.0)
    assert M.endpoint_error(a, b) == pytest.approx(5.0 / 4)


def test_similarity_report():
    g = np.random.default_rng(0)
    fixed = np.clip(g.random((12, 14, 16)), 0, 1).astype(np.float32)
    moving = np.roll(fixed, 3, axis=0)
    report = M.similarity_report(fixed, moving, fixed.copy())
    keys = {f"{m}_{when}" for m in ("ncc", "local_ncc", "mi", "mse") for when in ("before", "after")}
    assert set(report) == keys
    assert all(isinstance(v, float) for v in report.values())
    assert report["ncc_after"] == pytest.approx(1.0, abs=1e-5)
    assert report["local_ncc_after"] == pytest.approx(1.0, abs=1e-4)
    assert report["mse_after"] == 0.0 and report["mse_before"] > 0
    assert report["mi_after"] > report["mi_before"]
    with pytest.raises(ValueError, match="shape"):
        M.similarity_report(fixed, moving[:-1], fixed)


@pytest.mark.parametrize("shape", [(40, 36, 30), (50, 44), (7, 9, 8)])
def test_slab_local_ncc_is_the_whole_image_local_ncc(shape):
    """Slab by slab (down to one row per slab, halo = the window's radius) gives
    ``losses.local_ncc`` to float32 rounding, with flat regions, a window wider than an axis
    (7 voxels for a window of 9) and several images at once."""
    from voxreg import losses
    from voxreg.metrics.similarity import slab_measures

    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(1, 1, *shape, generator=g)
    fixed[..., :4] = 0.0
    moving = fixed + 0.3 * torch.rand(1, 1, *shape, generator=g)
    moving[..., :3] = 0.2
    other = torch.rand(1, 1, *shape, generator=g)
    expected = [float(losses.local_ncc(fixed, image, 9)) for image in (moving, other)]
    for slab_voxels in (1, 100, 2000, 10**9):
        got = slab_measures(fixed, {"moving": moving, "other": other}, 9, slab_voxels=slab_voxels)
        assert got["moving"]["local_ncc"] == pytest.approx(expected[0], abs=1e-6)
        assert got["other"]["local_ncc"] == pytest.approx(expected[1], abs=1e-6)
    assert expected[0] > expected[1] + 0.2  # the two images differ: the comparison is not trivial


def _brain_like(shape, seed, offset=(0, 0, 0)):
    """Noise inside an off-centre ellipsoid, a constant (0) outside: flat windows along every
    border, corner and between (a skull-stripped scan)."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(((x - 0.3 * o) / 0.55) ** 2 for x, o in zip(axes, offset)) < 1
    return (torch.rand(1, 1, *shape, generator=g) * inside)[:, :, ...]


@pytest.mark.parametrize(
    ("shape", "slab_voxels"),
    [((40, 36, 30), 36 * 30 * 3), ((40, 36, 30), 10**9), ((50, 44), 44 * 5), ((9, 11, 30), 11 * 30), ((7, 9, 8), 50)],
)
def test_flat_windows_skipped_give_the_values_of_every_window(shape, slab_voxels):
    """Windows where fixed and every other image are constant are not box summed: their local
    NCC comes from a small constant image clipped alike. The measures equal those of summing
    every window to float64 summation order (float32 values identical), for images flat on
    their borders, an image flat everywhere but not zero (a different flat value), one without
    any flat window (noise everywhere), axes shorter than 2r + 2, and slabs of a few rows."""
    from voxreg.losses.similarity import clip_window, window_sizes
    from voxreg.metrics.similarity import _FlatWindows, slab_measures

    offsets = [(1, -1, 0.5), (-1, 0.5, 1)][: len(shape)] if len(shape) == 3 else [(1, -1), (-1, 0.5)]
    fixed = _brain_like(shape, 1, offsets[0])
    others = {
        "moved": _brain_like(shape, 2, offsets[1]),
        "shifted": fixed.roll(2, -1),
        "constant": torch.full_like(fixed, 0.25),
        "noise": torch.rand(fixed.shape, generator=torch.Generator().manual_seed(3)),
    }
    for chosen in (["moved", "shifted", "constant"], ["moved"], ["noise", "moved"]):
        images = {name: others[name] for name in chosen}
        dense = slab_measures(fixed, images, 9, slab_voxels=slab_voxels, skip_flat=False)
        skipped = slab_measures(fixed, images, 9, slab_voxels=slab_voxels)
        for name in chosen:
            assert skipped[name]["local_ncc"] == pytest.approx(dense[name]["local_ncc"], rel=1e-13, abs=0)
            assert skipped[name]["ncc"] == pytest.approx(dense[name]["ncc"], abs=1e-7)
            assert skipped[name]["mse"] == pytest.approx(dense[name]["mse"], rel=1e-6)
        values = [dense[name]["local_ncc"] for name in chosen]
        assert max(values) - min(values) > 1e-3 or len(chosen) == 1  # the images differ: not trivial
    sizes = clip_window(window_sizes(9, len(shape)), shape)
    flat = _FlatWindows(fixed, {"moved": others["moved"]}, sizes, 1e-5, (0.0, 1.0), {"moved": (0.0, 1.0)})
    boxes = flat.boxes(0, shape[0])
    if min(shape) > 9:  # some windows lie wholly outside the ellipsoids: skipped
        assert boxes is not None and math.prod(p.stop - p.start for p in boxes[0]) < math.prod(shape)


def test_flat_windows_of_a_constant_pair():
    """Two constant images: every window is flat (nothing box summed), and the value is the
    one every window gives when summed (eps / eps = 1 up to rounding)."""
    from voxreg.metrics.similarity import slab_measures

    fixed, other = torch.full((1, 1, 20, 18, 16), 3.0), torch.zeros(1, 1, 20, 18, 16)
    dense = slab_measures(fixed, {"o": other}, 9, skip_flat=False)["o"]["local_ncc"]
    assert slab_measures(fixed, {"o": other}, 9)["o"]["local_ncc"] == pytest.approx(dense, rel=1e-13)
    assert dense == pytest.approx(1.0, abs=1e-3)


def test_similarities_of_an_image_with_itself_and_a_flat_one():
    image = torch.rand(1, 1, 12, 13, 14, generator=torch.Generator().manual_seed(3))
    same = M.similarities(image, image.clone())
    assert abs(same["ncc"] - 1.0) < 1e-5 and same["mse"] == 0.0 and abs(same["local_ncc"] - 1.0) < 1e-4
    other = M.similarities(image, torch.rand(1, 1, 12, 13, 14, generator=torch.Generator().manual_seed(4)))
    assert other["ncc"] < 0.1 and other["mi"] < same["mi"]


def test_jacobian_stats_by_chunks_equal_the_whole_array(monkeypatch):
    """Float64 statistics streamed slab by slab (Chan's update for the std; one-row slabs here)
    give numpy's whole-array values on a folding field, with and without a mask."""
    from voxreg.core import spatial
    from voxreg.core.synthetic import smooth_random_field

    field = torch.as_tensor(smooth_random_field((40, 44, 36), max_displacement=6.0, smoothness=4.0, seed=3))
    det = spatial.jacobian_determinant(field)[0].numpy().astype(np.float64)
    mask = np.zeros(det.shape, bool)
    mask[5:30] = True
    monkeypatch.setattr(spatial, "_JACOBIAN_SLAB_VOXELS", 3 * 44 * 36)  # one row of the first axis per slab
    assert len(list(spatial.jacobian_determinant_slabs(field))) == 40
    for chosen, values in ((None, det.ravel()), (mask, det[mask])):
        got = M.jacobian_stats(field, mask=chosen)
        assert got["folding_percent"] == pytest.approx(100 * np.mean(values <= 0), abs=1e-12)
        assert got["folding_percent"] > 0 or chosen is not None  # the field folds somewhere
        assert got["log_jacobian_std"] == pytest.approx(np.std(np.log(np.clip(values, 1e-9, 1e9))), rel=1e-12)
        assert got["jacobian_min"] == values.min() and got["jacobian_max"] == values.max()
        assert got["jacobian_mean"] == pytest.approx(values.mean(), rel=1e-12)


@pytest.mark.parametrize("slab_voxels", [50 * 40, 7 * 50 * 40, 10**9])
def test_slab_measures_give_the_losses_global_ncc_and_mse(slab_voxels):
    """The global NCC and MSE that come with the local NCC's slab pass (float64 sums, one-row
    and uneven slabs too) equal ``losses.global_ncc`` and ``losses.mse`` of the whole images."""
    from voxreg import losses
    from voxreg.metrics.similarity import slab_measures

    g = torch.Generator().manual_seed(2)
    fixed = torch.rand(1, 1, 60, 50, 40, generator=g) + 3.0  # an offset: centring matters
    others = [fixed * 0.7 + 0.2 * torch.rand(fixed.shape, generator=g), torch.rand(fixed.shape, generator=g)]
    names = {"correlated": others[0], "independent": others[1], "flat": torch.full_like(fixed, 2.0)}
    got = slab_measures(fixed, names, 9, slab_voxels=slab_voxels)
    for name, other in zip(names, others):
        assert got[name]["ncc"] == pytest.approx(float(losses.global_ncc(fixed, other)), abs=2e-6)
        assert got[name]["mse"] == pytest.approx(float(losses.mse(fixed, other)), rel=1e-5)
        assert got[name]["local_ncc"] == pytest.approx(float(losses.local_ncc(fixed, other, 9)), abs=1e-6)
    assert got["correlated"]["ncc"] > 0.7 and abs(got["independent"]["ncc"]) < 0.02  # not trivial
    assert got["flat"]["ncc"] == 0.0  # a constant image
    assert got["flat"]["mse"] == pytest.approx(float(((fixed - 2.0) ** 2).mean()), rel=1e-5)
    assert slab_measures(fixed, {"same": fixed.clone()}, 9, slab_voxels=slab_voxels)["same"]["mse"] == 0.0


def test_dice_counts_chunk_by_chunk_as_in_one_piece(monkeypatch):
    """Labels are counted a chunk of voxels at a time (no int64 copy of whole maps): the same
    Dice as counting in one piece, and as the definition for a few labels by hand."""
    from voxreg.metrics import overlap

    rng = np.random.default_rng(7)
    fixed = rng.integers(0, 40, size=(13, 11, 9)).astype(np.int32)
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.integers(0, 40, size=fixed.shape)).astype(np.int32)
    whole = overlap.dice_per_label(fixed, warped)
    monkeypatch.setattr(overlap, "COUNT_CHUNK", 17)
    assert overlap.dice_per_label(fixed, warped) == whole
    for label in (1, 20, 39):
        a, b = fixed == label, warped == label
        assert whole[label] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_dice_of_several_maps_at_once_is_each_map_alone(monkeypatch):
    """The fixed map converted and counted once for three maps (float codes, chunks of 1,000
    voxels, a label absent from one map, and negative labels through the unique-values path)
    gives each map's own Dice, hand-checked on one label."""
    import voxreg.metrics.overlap as O

    monkeypatch.setattr(O, "COUNT_CHUNK", 1000)
    g = np.random.default_rng(4)
    fixed = g.integers(0, 6, size=(30, 20, 11)).astype(np.float32) * 1000
    maps = [np.where(g.random(fixed.shape) < p, fixed, 2000.0).astype(np.float32) for p in (0.9, 0.5, 0.1)]
    maps[1][maps[1] == 3000] = 0
    many = O.dice_per_label_many(fixed, maps, [1000, 2000, 3000, 7000])
    np.testing.assert_equal(many, [O.dice_per_label(fixed, m, [1000, 2000, 3000, 7000]) for m in maps])  # NaN == NaN
    both, f, w = ((fixed == 1000) & (maps[0] == 1000)).sum(), (fixed == 1000).sum(), (maps[0] == 1000).sum()
    assert many[0][1000] == pytest.approx(2 * both / (f + w), rel=1e-12)
    assert many[1][3000] == 0.0 and math.isnan(many[0][7000])
    assert many[0][1000] > many[1][1000] > many[2][1000]  # the maps differ
    negative = [fixed - 1, *(m - 1 for m in maps)]
    assert O.dice_per_label_many(negative[0], negative[1:], [999, 1999]) == [
        {999: d[1000], 1999: d[2000]} for d in many
    ]
