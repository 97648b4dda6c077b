"""benchmarks/multiphase_ct.py: phase simulation and breathing field on synthetic data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from voxreg import metrics

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multiphase_ct.py"


@pytest.fixture(scope="module")
def mp():
    spec = importlib.util.spec_from_file_location("multiphase_ct", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CODES = {"liver": 5, "spleen": 1, "kidney_left": 3, "kidney_right": 2, "aorta": 52}


def _phantom(shape=(24, 20, 16), seed=0):
    """Unenhanced-looking CT: fat background with liver, spleen, a left kidney and aorta boxes."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -100.0, np.float32) + rng.normal(0, 5, shape).astype(np.float32)
    seg = np.zeros(shape, np.int16)
    seg[2:12, 2:12, 3:13] = CODES["liver"]
    seg[14:20, 3:9, 4:10] = CODES["spleen"]
    seg[13:21, 11:18, 2:10] = CODES["kidney_left"]
    seg[3:6, 14:17, :] = CODES["aorta"]
    native = {"liver": 50.0, "spleen": 40.0, "kidney_left": 30.0, "aorta": 40.0}
    for name, hu in native.items():
        mask = seg == CODES[name]
        ct[mask] = hu + rng.normal(0, 15, int(mask.sum())).astype(np.float32)
    return ct, seg


def test_simulate_phase_sets_organ_hu_and_keeps_texture(mp):
    ct, seg = _phantom()
    phase = {
        "liver": 75.0,
        "spleen": 125.0,
        "aorta": 320.0,
        "kidney": (190.0, 90.0),
        "portal_vein_and_splenic_vein": 150.0,
    }  # absent organ: ignored
    out = mp.simulate_phase(ct, seg, CODES, phase, spacing=(3.0, 3.0, 3.0), texture=1.0, cortex_mm=3.0)
    assert out.dtype == np.float32 and out.shape == ct.shape
    for name in ("liver", "spleen", "aorta"):
        mask = seg == CODES[name]
        assert np.median(out[mask]) == pytest.approx(phase[name], abs=1e-3)
        # texture kept: same deviations from the median
        np.testing.assert_allclose(out[mask] - np.median(out[mask]), ct[mask] - np.median(ct[mask]), atol=1e-3)
    background = seg == 0
    np.testing.assert_array_equal(out[background], ct[background])  # other tissue unchanged
    kidney = seg == CODES["kidney_left"]
    cortex = mp.kidney_cortex_mask(kidney, (3.0, 3.0, 3.0), 3.0)
    assert cortex.any() and (kidney & ~cortex).any() and not (cortex & ~kidney).any()
    assert out[cortex].mean() - out[kidney & ~cortex].mean() == pytest.approx(100.0, abs=10.0)
    # texture factor 2 doubles the deviations
    doubled = mp.simulate_phase(ct, seg, CODES, {"liver": 75.0}, texture=2.0)
    liver = seg == CODES["liver"]
    assert np.std(doubled[liver]) == pytest.approx(2 * np.std(ct[liver]), rel=1e-3)


def test_heterogeneity_and_noise_are_seeded(mp):
    ct, seg = _phantom()
    a = mp.simulate_phase(ct, seg, CODES, {"spleen": 125.0}, heterogeneity={"spleen": 35.0}, seed=3)
    b = mp.simulate_phase(ct, seg, CODES, {"spleen": 125.0}, heterogeneity={"spleen": 35.0}, seed=3)
    plain = mp.simulate_phase(ct, seg, CODES, {"spleen": 125.0})
    np.testing.assert_array_equal(a, b)
    spleen = seg == CODES["spleen"]
    assert 0 < np.abs(a - plain)[spleen].max() <= 35.0 + 1e-3
    np.testing.assert_array_equal(a[~spleen], plain[~spleen])
    noisy = mp.add_noise(plain, 12.0, seed=1)
    assert np.std(noisy - plain) == pytest.approx(12.0, rel=0.05)
    np.testing.assert_array_equal(noisy, mp.add_noise(plain, 12.0, seed=1))


@pytest.mark.parametrize("flip_si", [False, True])
def test_breathing_field_direction_and_size(mp, flip_si):
    shape = (20, 18, 16)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])  # RAS, 3 mm along S-I (axis 2)
    if flip_si:  # RAI: index increases towards inferior
        affine[2, 2] = -3.0
    axes = mp.anatomical_axes(affine)
    assert axes["SI"] == (2, -1 if flip_si else 1) and axes["AP"] == (1, 1)
    field = mp.breathing_field(shape, affine, si_mm=9.0, ap_mm=2.0, random_mm=0.0)
    assert field.shape == (1, 3, *shape) and field.dtype == torch.float32
    si = field[0, 2].numpy() * 3.0  # mm
    top = -1 if not flip_si else 0  # most superior slice
    assert np.abs(si).max() == pytest.approx(9.0, rel=1e-5)
    assert np.abs(si[..., top]).min() == pytest.approx(9.0, rel=1e-5)  # uniform weight: max all over the top
    assert np.abs(si[..., -1 - top]).max() == pytest.approx(0.3 * 9.0, rel=1e-5)
    # anatomy moves cranially: the moving image samples the fixed one towards inferior
    assert np.all(np.sign(si) == (-1 if not flip_si else 1))
    assert np.abs(field[0, 1].numpy() * 2.0).max() == pytest.approx(2.0, rel=1e-5)
    assert np.abs(field[0, 0].numpy()).max() == 0.0
    with_random = mp.breathing_field(shape, affine, weight=np.full(shape, 0.5), random_mm=2.0, seed=1)
    assert metrics.jacobian_stats(with_random)["folding_percent"] == 0.0


def test_warp_moves_labels_cranially(mp):
    shape = (12, 12, 20)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    seg = np.zeros(shape, np.int16)
    seg[3:9, 3:9, 8:14] = 5
    field = mp.breathing_field(shape, affine, si_mm=6.0, ap_mm=0.0, random_mm=0.0, floor=1.0)  # rigid 2 voxels
    moved = mp.warp_array(seg, field, nearest=True)
    assert set(np.unique(moved)) <= {0, 5}
    assert np.nonzero(moved)[2].mean() == pytest.approx(np.nonzero(seg)[2].mean() + 2.0)


def test_missing_data_exits_cleanly(mp, tmp_path):
    with pytest.raises(SystemExit, match="data not found"):
        mp.find_dataset(tmp_path)
