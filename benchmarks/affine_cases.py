"""Affine pre-alignment on real scans, voxreg vs ANTs affine (antspyx, when installed) in the
same run: NCC before/after and seconds for
  - C2FViT OASIS image_B -> image_A (256^3, LIA, unaligned),
  - Colin27 (templates_antspy/ch2) -> MNI152 (templates_antspy/mni),
  - Mindboggle OASIS-TRT-20-1 -> MNI152,
and the recovered-transform error in mm for a copy of Mindboggle subject 1 stored flipped,
permuted and oblique (20 deg rotation, 15 mm shift written into its header).

NCC is the global NCC of the moving scan resampled onto the fixed grid (linear), over the
whole fixed grid. Usage: python benchmarks/affine_cases.py [--no-ants]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from voxreg import io, losses
from voxreg.core.image import Image
from voxreg.registration import pipeline as api
from voxreg.registration.affine import affine_register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri"


def ncc(fixed: Image, moving: Image, world: np.ndarray | None) -> float:
    on_fixed = api.warp_image(moving, fixed, world_matrix=world)
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # noqa: E731
    return float(losses.global_ncc(to_tensor(fixed.array), to_tensor(on_fixed.array)))


def ants_affine(fixed_path: Path, moving_path: Path) -> tuple[np.ndarray, float]:
    """ANTs affine (antspy defaults for 'Affine'); returns the RAS world matrix and seconds."""
    import ants

    f, m = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    start = time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform="Affine")
    return io.read_itk_affine(reg["fwdtransforms"][0]), time.perf_counter() - start


def ncc_case(name: str, fixed_path: Path, moving_path: Path, use_ants: bool) -> dict:
    fixed, moving = io.load_image(fixed_path), io.load_image(moving_path)
    result = affine_register(fixed, moving)
    row = {
        "case": name,
        "ncc_before": ncc(fixed, moving, None),
        "ncc_voxreg": ncc(fixed, moving, result.world_matrix),
        "seconds_voxreg": result.seconds,
    }
    if use_ants:
        world, seconds = ants_affine(fixed_path, moving_path)
        row.update(ncc_ants=ncc(fixed, moving, world), seconds_ants=seconds)
    return row


def oblique_copy(image: Image) -> tuple[Image, np.ndarray]:
    """The scan stored flipped + permuted, with a 20 deg rotation and 15 mm shift in its header.
    Returns the copy and T (4x4 RAS) mapping original world points to the copy's world points."""
    reoriented = nib.Nifti1Image(image.array, image.affine).as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
    angle = np.deg2rad(20.0)
    transform = np.eye(4)
    transform[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    transform[:3, 3] = [15.0, -10.0, 5.0]
    copy = Image(np.asarray(reoriented.dataobj, dtype=np.float32), transform @ reoriented.affine)
    return copy, transform


def transform_error_mm(world: np.ndarray, truth: np.ndarray, fixed: Image) -> tuple[float, float]:
    """Mean and max distance (mm) between where ``world`` and ``truth`` send the brain voxels."""
    index = np.argwhere(fixed.array > 0)[::50]
    points = fixed.affine @ np.c_[index, np.ones(len(index))].T
    distance = np.linalg.norm((world @ points - truth @ points)[:3], axis=0)
    return float(distance.mean()), float(distance.max())


def reoriented_case(path: Path, use_ants: bool) -> dict:
    fixed = io.load_image(path)
    moving, truth = oblique_copy(fixed)
    result = affine_register(fixed, moving)
    mean, worst = transform_error_mm(result.world_matrix, truth, fixed)
    row = {
        "case": "Mindboggle-1 vs its flipped/permuted/oblique copy",
        "error_mm_mean_voxreg": mean,
        "error_mm_max_voxreg": worst,
        "seconds_voxreg": result.seconds,
    }
    if use_ants:
        with tempfile.TemporaryDirectory() as tmp:
            moving_path = io.save_image(moving, Path(tmp) / "copy.nii.gz")
            world, seconds = ants_affine(path, moving_path)
        mean, worst = transform_error_mm(world, truth, fixed)
        row.update(error_mm_mean_ants=mean, error_mm_max_ants=worst, seconds_ants=seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-ants", action="store_true")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"data not found: {args.data}")
    use_ants = not args.no_ants
    if use_ants:
        try:
            import ants  # noqa: F401
        except ImportError:
            print("antspyx not installed (pip install 'voxreg[ants]'): ANTs columns skipped")
            use_ants = False
    d = args.data
    mindboggle = d / "mindboggle_oasis_trt20" / "OASIS-TRT-20-1" / "t1weighted_brain.nii.gz"
    cases = [
        (
            "C2FViT image_B -> image_A",
            d / "c2fvit_oasis_native" / "image_A.nii.gz",
            d / "c2fvit_oasis_native" / "image_B.nii.gz",
        ),
        ("Colin27 -> MNI152", d / "templates_antspy" / "mni.nii.gz", d / "templates_antspy" / "ch2.nii.gz"),
        ("Mindboggle-1 -> MNI152", d / "templates_antspy" / "mni.nii.gz", mindboggle),
    ]
    for name, fixed, moving in cases:
        print(json.dumps(ncc_case(name, fixed, moving, use_ants)), flush=True)
    print(json.dumps(reoriented_case(mindboggle, use_ants)), flush=True)


if __name__ == "__main__":
    main()
