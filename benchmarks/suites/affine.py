"""Affine pre-alignment on real scans, voxreg against ANTs affine (antspyx, when installed) in
the same run (port of the retired affine_cases.py; the check run whenever the affine stage
changes): global NCC of the moving scan resampled onto the fixed grid before/after, seconds, for

  - C2FViT OASIS image_B -> image_A (256^3, LIA, unaligned),
  - Colin27 -> MNI152, Mindboggle OASIS-TRT-20-1 -> MNI152,

and the recovered-transform error (mm, over brain voxels) for a copy of Mindboggle subject 1
stored flipped, permuted and oblique (20 deg rotation, (15, -10, 5) mm shift in its header).
Measured in one fresh process. ``--quick``: Colin27 -> MNI152 only, no ANTs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import pairs, timing

SUMMARY = "affine stage vs ANTs affine: NCC and seconds on 3 real cases, error on an oblique copy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the affine suite."""
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs columns")


def _ncc(fixed: Any, moving: Any, world: Any) -> float:
    """Global NCC of ``moving`` resampled onto ``fixed`` through ``world`` (None: the headers)."""
    import numpy as np
    import torch

    from voxreg import losses
    from voxreg.registration import pipeline as api

    on_fixed = api.warp_image(moving, fixed, world_matrix=world)
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # noqa: E731
    return float(losses.global_ncc(tensor(fixed.array), tensor(on_fixed.array)))


def _ants_affine(fixed_path: Path, moving_path: Path) -> tuple[Any, float]:
    """ANTs affine (antspy defaults for 'Affine'); the RAS world matrix and seconds."""
    import time

    import ants

    from voxreg import io

    f, m = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    start = time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform="Affine")
    return io.read_itk_affine(reg["fwdtransforms"][0]), time.perf_counter() - start


def ncc_case(name: str, fixed_path: str, moving_path: str, use_ants: bool) -> dict[str, Any]:
    """NCC before / after voxreg (and ANTs) affine, and their seconds."""
    from voxreg import io
    from voxreg.registration.affine import affine_register

    fixed, moving = io.load_image(fixed_path), io.load_image(moving_path)
    result = affine_register(fixed, moving)
    row = {
        "case": name,
        "ncc_before": _ncc(fixed, moving, None),
        "ncc_voxreg": _ncc(fixed, moving, result.world_matrix),
    }
    row["seconds_voxreg"] = result.seconds
    if use_ants:
        world, seconds = _ants_affine(Path(fixed_path), Path(moving_path))
        row.update(ncc_ants=_ncc(fixed, moving, world), seconds_ants=seconds)
    return row


def oblique_copy(image: Any) -> tuple[Any, Any]:
    """The scan stored flipped + permuted, with a 20 deg rotation and 15 mm shift in its header;
    returns the copy and T (4x4 RAS) mapping original world points to the copy's."""
    import nibabel as nib
    import numpy as np

    from voxreg.core.image import Image

    reoriented = nib.Nifti1Image(image.array, image.affine).as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
    angle = np.deg2rad(20.0)
    transform = np.eye(4)
    transform[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    transform[:3, 3] = [15.0, -10.0, 5.0]
    return Image(np.asarray(reoriented.dataobj, dtype=np.float32), transform @ reoriented.affine), transform


def transform_error_mm(world: Any, truth: Any, fixed: Any) -> tuple[float, float]:
    """Mean and max distance (mm) between where ``world`` and ``truth`` send the brain voxels."""
    import numpy as np

    index = np.argwhere(fixed.array > 0)[::50]
    points = fixed.affine @ np.c_[index, np.ones(len(index))].T
    distance = np.linalg.norm((world @ points - truth @ points)[:3], axis=0)
    return float(distance.mean()), float(distance.max())


def reoriented_case(path: str, use_ants: bool) -> dict[str, Any]:
    """Recovered-transform error for the flipped/permuted/oblique copy of ``path``."""
    from voxreg import io
    from voxreg.registration.affine import affine_register

    fixed = io.load_image(path)
    moving, truth = oblique_copy(fixed)
    result = affine_register(fixed, moving)
    mean, worst = transform_error_mm(result.world_matrix, truth, fixed)
    row = {"case": "Mindboggle-1 vs its flipped/permuted/oblique copy", "error_mm_mean_voxreg": mean}
    row |= {"error_mm_max_voxreg": worst, "seconds_voxreg": result.seconds}
    if use_ants:
        with tempfile.TemporaryDirectory() as tmp:
            world, seconds = _ants_affine(Path(path), io.save_image(moving, Path(tmp) / "copy.nii.gz"))
        mean, worst = transform_error_mm(world, truth, fixed)
        row.update(error_mm_mean_ants=mean, error_mm_max_ants=worst, seconds_ants=seconds)
    return row


def all_cases(data: str, quick: bool, use_ants: bool) -> list[dict[str, Any]]:
    """Every case (the child process's entry point)."""
    t = pairs.brain_templates(Path(data))
    subject = str(pairs.mindboggle_subject(1, Path(data))[0])
    cases = [("Colin27 -> MNI152", t["mni"], t["colin27"])]
    if not quick:
        cases = [
            ("C2FViT image_B -> image_A", t["c2fvit_a"], t["c2fvit_b"]),
            *cases,
            ("Mindboggle-1 -> MNI152", t["mni"], subject),
        ]
    rows = [ncc_case(name, str(f), str(m), use_ants) for name, f, m in cases]
    return rows if quick else [*rows, reoriented_case(subject, use_ants)]


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """All cases in one fresh process."""
    if not pairs.brain_templates(args.data)["mni"].is_file():
        print(f"skipped: brain templates not found under {args.data}")
        return None
    use_ants = not (args.no_ants or args.quick)
    if use_ants:
        import importlib.util

        use_ants = importlib.util.find_spec("ants") is not None
    kwargs = {"data": str(args.data), "quick": args.quick, "use_ants": use_ants}
    rows = timing.measure_call("benchmarks.suites.affine:all_cases", kwargs, repeats=1)["value"]
    return {"ants": use_ants, "rows": rows}


def render(document: dict[str, Any]) -> str:
    """The NCC table, then the oblique copy's error."""
    fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| case | NCC before | voxreg affine | ANTs affine |", "|---|---|---|---|"]
    for r in document["rows"]:
        if "ncc_before" in r:
            ants = f"{fmt(r.get('ncc_ants'))} ({fmt(r.get('seconds_ants'), 1)} s)" if "ncc_ants" in r else "not run"
            lines.append(
                f"| {r['case']} | {fmt(r['ncc_before'])} | {fmt(r['ncc_voxreg'])} ({fmt(r['seconds_voxreg'], 2)} s) | {ants} |"
            )
    for r in document["rows"]:
        if "error_mm_mean_voxreg" in r:
            lines += ["", f"{r['case']}: mean / max error voxreg {r['error_mm_mean_voxreg']:.1e} / "
                      f"{r['error_mm_max_voxreg']:.1e} mm ({r['seconds_voxreg']:.2f} s)"]  # fmt: skip
            if "error_mm_mean_ants" in r:
                lines[-1] += (
                    f", ANTs {r['error_mm_mean_ants']:.3f} / {r['error_mm_max_ants']:.3f} mm ({r['seconds_ants']:.1f} s)"
                )
    return "\n".join(lines) + "\n"
