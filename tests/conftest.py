"""Shared fixtures: small synthetic images written to disk, and the shared data folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def smooth_volume(shape, seed=0) -> np.ndarray:
    """A smooth positive test image in [0, 1] with structure along every axis."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    out = np.zeros(shape, np.float32)
    for _ in range(5):
        centre = rng.uniform(0.25, 0.75, len(shape))
        width = rng.uniform(0.08, 0.2)
        out += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2))
    return (out / out.max()).astype(np.float32)


def gaussian_blob(spacing, centre_mm, extent_mm=(96.0, 96.0, 96.0)):
    """A 3D Gaussian blob (sigma ~10 mm) centred at ``centre_mm`` on a grid of ``spacing``
    covering ``extent_mm``, as an Image whose voxel centres sit at (i + 0.5) * spacing - 40 mm:
    a scan whose centre of mass is known in millimetres at any voxel size."""
    from voxreg.core.image import Image

    shape = tuple(int(round(e / s)) for e, s in zip(extent_mm, spacing))
    coords = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    r2 = sum((c - m) ** 2 / 14.0**2 for c, m in zip(coords, centre_mm))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [0.5 * s - 40.0 for s in spacing]
    return Image(np.exp(-r2).astype(np.float32), affine)


class CentroidShift(torch.nn.Module):
    """A stand-in network: ``fraction`` of the constant field that moves the moving image's
    centre of mass onto the fixed one's, in voxels of its input grid (1: what a perfect rigid
    net predicts), or ``constant`` voxels along the first axis when given; it records the
    moving images it was given (``seen``)."""

    def __init__(self, fraction: float = 1.0, constant: float | None = None) -> None:
        super().__init__()
        self.fraction, self.constant = fraction, constant
        self.seen: list[torch.Tensor] = []

    @staticmethod
    def _centroid(image: torch.Tensor) -> torch.Tensor:
        axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in image.shape[2:]], indexing="ij")
        weight = image[0, 0].double()
        return torch.stack([(a * weight).sum() / weight.sum() for a in axes])

    def forward(self, moving, fixed, lam=None):
        from types import SimpleNamespace

        self.seen.append(moving[0, 0].clone())
        shift = self.fraction * (self._centroid(moving) - self._centroid(fixed)).float()
        if self.constant is not None:
            shift = torch.zeros_like(shift)
            shift[0] = self.constant
        field = shift.view(1, -1, *([1] * (fixed.dim() - 2))).expand(1, -1, *fixed.shape[2:])
        return SimpleNamespace(field=field.contiguous())


def box_training_set(shape, n=3, seed=0):
    """A tiny training set: ``n`` noisy boxes of slightly different sizes on a grid of ``shape``."""
    from voxreg.training import TrainingSet

    rng = np.random.default_rng(seed)
    images = torch.zeros(n, 1, *shape)
    for i in range(n):
        images[i, 0, 4 + i : -4, 5:-5, 4 : -4 - i] = 1.0
    images += 0.05 * torch.from_numpy(rng.random(images.shape).astype(np.float32))
    return TrainingSet(images, None, torch.zeros(n, dtype=torch.bool), np.eye(4))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def pair_3d(tmp_path: Path) -> dict[str, Path]:
    """A small 3D fixed/moving pair (moving = shifted fixed) with label maps on disk."""
    fixed = smooth_volume((24, 28, 20), seed=1)
    moving = np.roll(fixed, 2, axis=0)
    fixed_labels = (fixed > 0.4).astype(np.int16) + (fixed > 0.7)
    moving_labels = np.roll(fixed_labels, 2, axis=0)
    return {
        "fixed": write_nifti(tmp_path / "fixed.nii.gz", fixed),
        "moving": write_nifti(tmp_path / "moving.nii.gz", moving),
        "fixed_labels": write_nifti(tmp_path / "fixed_labels.nii.gz", fixed_labels),
        "moving_labels": write_nifti(tmp_path / "moving_labels.nii.gz", moving_labels),
    }


#: a reliability case's command line: (input folder, output path) -> arguments
Args = Callable[[Path, Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One row of a reliability matrix: ``args`` maps (input folder, output path) to a
    command line; the run must exit with ``exit`` and print ``message``."""

    id: str
    args: Args
    exit: int
    message: str


@pytest.fixture(scope="module")
def demo_pair():
    """The README demo's pair: the MNI152 2 mm template against a known smooth deformation of
    itself with an intensity change (core.synthetic, seed 0); the shipped-model tests use it."""
    from voxreg.core import synthetic
    from voxreg.io import normalize_intensity, templates

    template = templates.mni152_template(2)
    labels = templates.mni152_tissue_labels(2)
    scaled = template.with_array(normalize_intensity(template.array))
    return synthetic.make_synthetic_pair(scaled, labels, max_displacement=5.0, seed=0)
