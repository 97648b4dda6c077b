"""Tests of voxreg.synthetic: known fields, synthetic pairs, blobs and the MNI152 loaders."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from voxreg.core import spatial, synthetic
from voxreg.core.errors import VoxregError
from voxreg.io import templates

HAS_NILEARN = importlib.util.find_spec("nilearn") is not None


def _max_norm(field: torch.Tensor) -> float:
    return float(field.square().sum(dim=1).sqrt().max())


@pytest.mark.parametrize("shape", [(32, 40), (16, 20, 24)])
def test_smooth_random_field_max_and_jacobian(shape):
    field = synthetic.smooth_random_field(shape, max_displacement=3.0, smoothness=8.0, seed=1)
    assert field.shape == (1, len(shape), *shape) and field.dtype == torch.float32
    assert _max_norm(field) == pytest.approx(3.0, rel=1e-5)
    assert float(spatial.jacobian_determinant(field).min()) > 0


def test_smooth_random_field_seeded_and_zero():
    a = synthetic.smooth_random_field((24, 24), 2.0, seed=3)
    assert torch.equal(a, synthetic.smooth_random_field((24, 24), 2.0, seed=3))
    assert not torch.allclose(a, synthetic.smooth_random_field((24, 24), 2.0, seed=4))
    assert torch.count_nonzero(synthetic.smooth_random_field((8, 8), 0.0)) == 0
    with pytest.raises(VoxregError):
        synthetic.smooth_random_field((8, 8, 8, 8))


def test_intensity_change_range_and_identity():
    rng = np.random.default_rng(0)
    array = rng.random((20, 24), dtype=np.float32)
    out = synthetic.intensity_change(array, gamma=1.5, seed=2)
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out, synthetic.intensity_change(array, gamma=1.5, seed=2))
    plain = synthetic.intensity_change(array, gamma=2.0, bias_field_strength=0, noise_std=0)
    np.testing.assert_allclose(plain, array**2, rtol=1e-5, atol=1e-6)
    assert synthetic.intensity_change(np.ones((8, 8, 8)), noise_std=0).std() > 0  # bias field


@pytest.mark.parametrize("shape", [(40, 48), (20, 24, 28)])
def test_blobs_image(shape):
    image, labels = synthetic.blobs_image(shape, seed=0)
    assert image.shape == labels.shape == shape and image.array.dtype == np.float32
    assert labels.is_label and 0 <= image.array.min() and image.array.max() == pytest.approx(1.0)
    assert set(np.unique(labels.array)) <= {0, 1, 2, 3, 4} and labels.array.max() > 0


def _interior(ndim: int, margin: int = 6):
    return (slice(margin, -margin),) * ndim


@pytest.mark.parametrize("shape", [(48, 48), (24, 28, 32)])
def test_true_field_recovers_fixed(shape):
    image, labels = synthetic.blobs_image(shape, seed=1)
    pair = synthetic.make_synthetic_pair(
        image, labels, max_displacement=3.0, seed=0, smoothness=10, change_intensity=False
    )
    moving = torch.from_numpy(pair.moving.array)[None, None]
    back = spatial.warp(moving, pair.true_field)[0, 0].numpy()
    inner = _interior(len(shape))
    before = np.abs(pair.moving.array - pair.fixed.array)[inner].mean()
    after = np.abs(back - pair.fixed.array)[inner].mean()
    assert after < 0.2 * before
    # true_field is the inverse of forward_field: u(x) + v(x + u(x)) = 0 (the fixed point)
    residual = spatial.compose(pair.forward_field, pair.true_field)[(0, slice(None), *inner)]
    assert float(residual.abs().max()) < 0.05
    # labels follow the same field (nearest) and keep their dtype
    assert pair.moving_labels.array.dtype == labels.array.dtype
    back_labels = spatial.warp(torch.from_numpy(pair.moving_labels.array)[None, None], pair.true_field, mode="nearest")[
        0, 0
    ].numpy()
    fixed_l = pair.fixed_labels.array
    assert (back_labels == fixed_l)[inner].mean() > (pair.moving_labels.array == fixed_l)[inner].mean()


def test_pair_with_intensity_change_and_no_labels():
    image, _ = synthetic.blobs_image((32, 32), seed=2)
    pair = synthetic.make_synthetic_pair(image, None, max_displacement=2.0, seed=5)
    assert pair.fixed_labels is None and pair.moving_labels is None
    assert pair.moving.array.dtype == np.float32
    assert 0 <= pair.moving.array.min() and pair.moving.array.max() <= 1
    np.testing.assert_array_equal(pair.moving.affine, image.affine)
    assert pair.true_field.shape == (1, 2, 32, 32)


def test_missing_nilearn_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(VoxregError, match="nilearn"):
        templates.nilearn_data_dir()
    monkeypatch.undo()
    monkeypatch.setattr(templates, "nilearn_data_dir", lambda: tmp_path)
    with pytest.raises(VoxregError, match="not found"):
        templates._mni_path("t1")


@pytest.mark.skipif(not HAS_NILEARN, reason="nilearn (ships the MNI152 files) is not installed")
def test_mni152_template_shapes():
    t2 = templates.mni152_template(2)
    assert t2.shape == (99, 117, 95) and t2.array.dtype == np.float32
    np.testing.assert_allclose(t2.spacing, [2, 2, 2])
    assert 0 <= t2.array.min() and 0.5 < t2.array.max() <= 1
    assert templates.mni152_template(1).shape == (197, 233, 189)
    # 2 mm voxel centres sit at the centres of 2x2x2 blocks of the 1 mm grid
    np.testing.assert_allclose(t2.affine[:3, 3], templates.mni152_template(1).affine[:3, 3] + 0.5)


@pytest.mark.skipif(not HAS_NILEARN, reason="nilearn (ships the MNI152 files) is not installed")
def test_mni152_tissues():
    maps = templates.mni152_tissue_maps(2)
    assert set(maps) == {"csf", "gm", "wm"}
    for image in maps.values():
        assert image.shape == (99, 117, 95) and 0 <= image.array.min() and image.array.max() <= 1
    labels = templates.mni152_tissue_labels(2)
    assert labels.is_label and labels.shape == (99, 117, 95)
    values, counts = np.unique(labels.array, return_counts=True)
    assert list(values) == [0, 1, 2, 3] and counts.min() > 1000
    np.testing.assert_array_equal(labels.affine, maps["gm"].affine)
