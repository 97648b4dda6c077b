"""The MNI152 template and tissue maps, read from the files that ship inside the nilearn wheel.

The MNI152 (ICBM 2009a symmetric) template and its grey- and white-matter maps are read with
nibabel from ``nilearn/datasets/data/mni_icbm152_*_converted.nii.gz`` (197x233x189 at 1 mm,
RAS); nilearn itself is never imported and nothing is downloaded. nilearn ships no CSF map:
the CSF probability is derived as ``1 - GM - WM`` inside the template's brain mask.
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University (use and redistribution of derived works permitted with this notice).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from voxreg.core.errors import VoxregError
from voxreg.core.image import Image

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUE_LABELS = {0: "background", 1: "csf", 2: "gm", 3: "wm"}


def nilearn_data_dir() -> Path:
    """Folder of the data files shipped inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise VoxregError(
            "the MNI152 template needs the 'nilearn' package (pip install nilearn); "
            "it ships the template files, nothing is downloaded"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _mni_path(key: str) -> Path:
    path = nilearn_data_dir() / _MNI_FILES[key]
    if not path.is_file():
        raise VoxregError(
            f"MNI152 file not found: {path} (this nilearn version does not ship it; install nilearn>=0.10)"
        )
    return path


@lru_cache(maxsize=4)
def _load_mni_1mm(key: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw 1 mm array scaled to [0, 1] (float32) and its affine; cached, treat as read-only."""
    import nibabel as nib

    img = nib.load(str(_mni_path(key)))
    array = np.asarray(img.dataobj, dtype=np.float32)
    array /= max(float(array.max()), 1e-12)
    array.setflags(write=False)
    return array, img.affine.copy()


def _downsample(array: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average by an integer ``factor`` (zero-padded to a multiple); new voxel centres
    sit at the block centres, and the affine says so."""
    if factor == 1:
        return array.copy(), affine.copy()
    pad = [(0, (-s) % factor) for s in array.shape]
    padded = np.pad(array, pad)
    shape = [s // factor for s in padded.shape]
    blocks = padded.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32), affine @ scale


def _check_resolution(resolution_mm: int) -> int:
    if int(resolution_mm) != resolution_mm or resolution_mm < 1:
        raise VoxregError(f"resolution_mm must be a positive integer (1 or 2), got {resolution_mm}")
    return int(resolution_mm)


def _mni_image(key: str, resolution_mm: int) -> Image:
    array, affine = _load_mni_1mm(key)
    array, affine = _downsample(array, affine, _check_resolution(resolution_mm))
    return Image(array, affine, _mni_path(key))


def mni152_template(resolution_mm: int = 2) -> Image:
    """Skull-stripped MNI152 T1 template in [0, 1] (float32, RAS).

    Shape (197, 233, 189) at 1 mm, (99, 117, 95) at 2 mm (block average).
    """
    return _mni_image("t1", resolution_mm)


def _brain_mask_1mm() -> np.ndarray:
    t1, _ = _load_mni_1mm("t1")
    return ndimage.binary_fill_holes(t1 > 0)


def mni152_brain_mask(resolution_mm: int = 2) -> Image:
    """The template's brain mask (uint8, 1 inside) on the MNI152 grid at 1 or 2 mm."""
    resolution_mm = _check_resolution(resolution_mm)
    _, affine = _load_mni_1mm("t1")
    small, small_affine = _downsample(_brain_mask_1mm().astype(np.float32), affine, resolution_mm)
    return Image((small >= 0.5).astype(np.uint8), small_affine, kind="label")


def mni152_tissue_maps(resolution_mm: int = 2) -> dict[str, Image]:
    """Tissue probability maps ``{'csf', 'gm', 'wm'}`` (float32 in [0, 1]) on the template grid.

    GM and WM come from nilearn's files; CSF = ``clip(1 - GM - WM)`` inside the template's
    brain mask (nilearn ships no CSF map). Outside the brain all three are 0.
    """
    resolution_mm = _check_resolution(resolution_mm)
    brain = _brain_mask_1mm()
    gm, affine = _load_mni_1mm("gm")
    wm, _ = _load_mni_1mm("wm")
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    maps = {"csf": (csf, None), "gm": (gm * brain, "gm"), "wm": (wm * brain, "wm")}
    out = {}
    for name, (array, key) in maps.items():
        small, small_affine = _downsample(array.astype(np.float32), affine, resolution_mm)
        out[name] = Image(small, small_affine, _mni_path(key) if key else None)
    return out


def mni152_tissue_labels(resolution_mm: int = 2) -> Image:
    """Integer label map (int16): 0 background, 1 CSF, 2 GM, 3 WM (argmax of the tissue
    maps inside the brain mask, which is where the summed probabilities are >= 0.5)."""
    maps = mni152_tissue_maps(resolution_mm)
    stack = np.stack([maps["csf"].array, maps["gm"].array, maps["wm"].array])
    labels = (stack.argmax(axis=0) + 1).astype(np.int16)
    labels[stack.sum(axis=0) < 0.5] = 0
    return Image(labels, maps["gm"].affine.copy(), None)
