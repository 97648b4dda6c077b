"""ANTs SyN as an evaluation method (``ants-syn``): antspyx is imported lazily (with a clear
message naming the extra to install), images are handed over in LPS physical space, the
``*Warp.nii.gz`` (LPS mm) is converted to voxreg's field in fixed voxels, and landmarks are
mapped with ``ants.apply_transforms_to_points``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxreg import io
from voxreg.core.errors import VoxregError
from voxreg.core.grid import apply_matrix, reduced_affine, voxel_spacing
from voxreg.core.image import Image
from voxreg.evaluation.types import EvaluationOptions, MethodOutput

if TYPE_CHECKING:
    from voxreg.evaluation.types import PairData

ANTS_MISSING = "ANTs SyN needs antspyx: pip install 'voxreg[ants]'"


def import_ants() -> Any:
    """The ``ants`` module (antspyx), or a VoxregError saying how to install it."""
    try:
        import ants
    except ImportError:
        raise VoxregError(ANTS_MISSING) from None
    return ants


def to_ants_image(image: Image, ants: Any) -> Any:
    """ANTsImage (LPS physical space, same array index order) of a voxreg image. A 2D image
    must lie parallel to the x-y plane; its z offset is dropped (both images of a 2D pair are
    taken to lie in one plane, as in :func:`voxreg.core.grid.voxel_matrix`)."""
    ndim = image.ndim
    if ndim == 2 and not np.allclose(image.affine[2, :2], 0.0, atol=1e-6 * np.abs(image.affine[:3, :2]).max()):
        raise VoxregError(
            f"{image.path or 'image'}: ANTs needs a 2D image parallel to the x-y plane; this one is tilted"
        )
    lps = reduced_affine(io.RAS_TO_LPS @ image.affine, ndim)
    spacing = voxel_spacing(lps)
    return ants.from_numpy(
        np.ascontiguousarray(image.array, dtype=np.float32),
        origin=lps[:ndim, ndim].tolist(),
        spacing=spacing.tolist(),
        direction=lps[:ndim, :ndim] / spacing,
    )


def ants_field_to_voxels(displacement: np.ndarray, fixed: Image) -> np.ndarray:
    """Convert an ITK/ANTs displacement ``(*S, ndim)`` in LPS mm on ``fixed``'s grid to
    voxreg's field ``(ndim, *S)`` in fixed voxels (the inverse of
    :func:`voxreg.io.field_to_itk_image`)."""
    ndim = fixed.ndim
    if displacement.shape != (*fixed.shape, ndim):
        raise VoxregError(
            f"ANTs warp field of shape {displacement.shape} is not on the fixed grid {(*fixed.shape, ndim)}"
        )
    lps_to_voxel = np.linalg.inv(reduced_affine(io.RAS_TO_LPS @ fixed.affine, ndim))
    field = np.einsum("ij,...j->i...", lps_to_voxel[:ndim, :ndim], displacement.astype(np.float64))
    return np.ascontiguousarray(field, dtype=np.float32)


def ants_map_points(points: np.ndarray, transforms: Sequence[str], ndim: int, ants: Any) -> np.ndarray:
    """Map fixed world points ``(n, 3)`` (RAS mm) to moving world points with
    ``ants.apply_transforms_to_points`` and the registration's ``fwdtransforms`` (points
    move opposite to images: the forward list maps fixed points into the moving scan)."""
    import pandas as pd

    lps = apply_matrix(io.RAS_TO_LPS, points)
    columns = list("xyz")[:ndim]
    frame = pd.DataFrame(lps[:, :ndim], columns=columns)
    mapped = ants.apply_transforms_to_points(ndim, frame, list(transforms))[columns].to_numpy(np.float64)
    out = lps.copy()
    out[:, :ndim] = mapped
    return apply_matrix(io.RAS_TO_LPS, out)  # LPS <-> RAS is its own inverse


def ants_settings(ants: Any, threads: int) -> dict[str, Any]:
    """The exact settings of ``ants.registration(type_of_transform="SyN")`` (antspyx defaults,
    read from its signature) and of this run."""
    import importlib.metadata
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(ants.registration).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("outprefix", "verbose")
    }
    syn = f"SyN[{defaults.get('grad_step')},{defaults.get('flow_sigma')},{defaults.get('total_sigma')}]"
    iterations = "x".join(str(i) for i in defaults.get("reg_iterations", ()))
    return {
        "call": "ants.registration(fixed, moving, type_of_transform='SyN')",
        "type_of_transform": "SyN",
        "antspyx": importlib.metadata.version("antspyx"),
        "threads": threads,
        "threads_env": "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (ITK reads it once per process, at first use)",
        "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()},
        "stages (antspyx SyN preset)": [
            "initial: [fixed,moving,1] (centre of mass)",
            f"Affine[0.25] {defaults.get('aff_metric')}[1,{defaults.get('aff_sampling')},regular,"
            f"{defaults.get('aff_random_sampling_rate')}] 2100x1200x1200x0 smooth 3x2x1x0 shrink 4x2x2x1",
            f"{syn} {defaults.get('syn_metric')}[1,{defaults.get('syn_sampling')}] [{iterations},1e-7,8]",
        ],
        "labels": "ants.apply_transforms(interpolator='genericLabel')",
        "seconds": "ants.registration call only",
    }


def run_ants_syn(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """ANTs SyN (antspyx defaults) with ``options.ants_threads`` ITK threads (default: all
    cores; set through ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, which ITK reads at its first use
    in the process, so one process should keep one value); temporary files stay in a
    TemporaryDirectory."""
    ants = import_ants()
    threads = int(options.ants_threads or os.cpu_count() or 1)
    with (
        tempfile.TemporaryDirectory(prefix="voxreg-ants-") as tmp,
        _environment(ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads)),
    ):
        fixed_ants, moving_ants = to_ants_image(data.fixed, ants), to_ants_image(data.moving, ants)
        start = time.perf_counter()
        reg = ants.registration(fixed_ants, moving_ants, type_of_transform="SyN", outprefix=str(Path(tmp) / "syn_"))
        seconds = time.perf_counter() - start
        transforms = list(reg["fwdtransforms"])
        warp = [t for t in transforms if t.endswith("Warp.nii.gz")]
        if len(warp) != 1:
            raise VoxregError(f"ANTs SyN returned no single *Warp.nii.gz transform ({transforms})")
        field = ants_field_to_voxels(ants.image_read(warp[0]).numpy(), data.fixed)
        warped_labels = None
        if data.moving_labels is not None:
            labels = ants.apply_transforms(
                fixed_ants, to_ants_image(data.moving_labels, ants), transforms, interpolator="genericLabel"
            )
            warped_labels = Image(np.rint(labels.numpy()).astype(np.int32), data.fixed.affine.copy())
        mapped = None
        if data.fixed_points is not None:
            mapped = ants_map_points(data.fixed_points, transforms, data.fixed.ndim, ants)
    warped = Image(reg["warpedmovout"].numpy().astype(np.float32), data.fixed.affine.copy())
    return MethodOutput(
        warped=warped,
        field=field,
        seconds=seconds,
        warped_labels=warped_labels,
        map_points=lambda points: _precomputed(points, data.fixed_points, mapped),
        device="cpu",
        threads=threads,
        settings=ants_settings(ants, threads),
    )


def _precomputed(points: np.ndarray, known: np.ndarray | None, mapped: np.ndarray | None) -> np.ndarray:
    """The points mapped while ANTs' transform files still existed."""
    if known is None or mapped is None or not np.array_equal(points, known):
        raise ValueError("ANTs maps only the pair's fixed landmarks")
    return mapped


class _environment:
    """Set environment variables inside a ``with`` block, restoring them afterwards."""

    def __init__(self, **values: str) -> None:
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
