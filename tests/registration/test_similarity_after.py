"""metrics.json's similarity "after" the registration is measured on the registration's own
output (warped.nii.gz: the raw moving scan resampled once), on the moving scan's intensity
scale, not on the affine-resampled scan warped a second time."""

import numpy as np
import pytest
import torch

from voxreg.core.image import Image
from voxreg.registration.outputs import RegistrationResult, measure_registration


def _result(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, field: torch.Tensor) -> RegistrationResult:
    affine = np.eye(4)
    return RegistrationResult(Image(fixed, affine), Image(moving, affine), Image(warped, affine), field)


def test_after_is_the_warped_output_itself():
    """The field is zero, but the output holds the fixed scan: "after" scores the output
    (NCC 1, MSE 0), which a second warp of the moving scan by the field would not."""
    rng = np.random.default_rng(0)
    fixed = rng.random((16, 18, 20), dtype=np.float32)
    moving = rng.permutation(fixed.ravel()).reshape(fixed.shape)  # the same values: the same scale
    zero = torch.zeros(1, 3, *fixed.shape)
    similarity = measure_registration(_result(fixed, moving, fixed.copy(), zero))["similarity"]
    assert similarity["ncc_after"] == pytest.approx(1.0, abs=1e-6)
    assert similarity["local_ncc_after"] == pytest.approx(1.0, abs=1e-4)
    assert similarity["mse_after"] == pytest.approx(0.0, abs=1e-12)
    assert abs(similarity["ncc_before"]) < 0.05  # the permuted scan is unrelated to the fixed one


def test_after_keeps_the_moving_scans_intensity_scale():
    """The output is scaled by the moving scan's percentiles, not its own: an output at half
    the moving scan's intensities is half as bright after normalisation (MSE against a fixed
    scan equal to the moving one: mean of (x/2 - x)^2 over the normalised x)."""
    ramp = np.linspace(0.0, 1.0, 16 * 18 * 20, dtype=np.float32).reshape(16, 18, 20) + 1.0  # no zero background
    zero = torch.zeros(1, 3, *ramp.shape)
    similarity = measure_registration(_result(ramp, ramp, ramp / 2, zero))["similarity"]
    low, high = np.percentile(ramp, [0.5, 99.5])
    normalised = np.clip((ramp - low) / (high - low), 0, 1)
    halved = np.clip((ramp / 2 - low) / (high - low), 0, 1)
    assert similarity["mse_after"] == pytest.approx(float(((normalised - halved) ** 2).mean()), rel=1e-5)
    assert similarity["mse_before"] == pytest.approx(0.0, abs=1e-12)


def test_the_moving_scan_is_made_once_when_two_threads_ask():
    """The metrics and the figure threads both ask for the moving scan on the fixed grid when
    a network ran alone (made on first use): it is made once, the second thread waiting for it
    (a slow maker keeps both inside at the same time), and both get the same image."""
    import threading
    import time

    made = []

    def make() -> Image:
        made.append(threading.get_ident())
        time.sleep(0.2)
        return Image(np.ones((4, 5, 6), np.float32), np.eye(4))

    image = Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    result = RegistrationResult(image, make, image, torch.zeros(1, 3, 4, 5, 6))
    got = []
    threads = [threading.Thread(target=lambda: got.append(result.moving)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and got[0] is got[1] and float(got[0].array.sum()) == 120.0
