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
