"""Bring a set of raw scans into one atlas space for training (``voxreg preprocess``).

For every scan: load it, align it to the atlas with :func:`voxreg.affine.affine_register`
(atlas = fixed, so the world matrix maps atlas world points to scan world points), scale
its intensities to [0, 1] (:func:`voxreg.io.normalize_intensity`, with an optional CT
window) and resample it once, through that matrix, onto the *target grid*. Label maps
ride along with nearest neighbour (same matrix); with ``mask_labels`` the intensities
outside ``labels > 0`` are zeroed (and the scan is masked that way for the alignment too).

The target grid (:func:`network_grid`) is the atlas grid resampled to the requested
isotropic spacing and cropped/padded symmetrically about its world centre so that every
axis is a multiple of ``multiple`` (network friendly).

Outputs in the output folder (each written atomically):

- ``<name>.nii.gz`` (float32 in [0, 1]) and ``<name>_labels.nii.gz`` (integer) per scan;
  ``<name>`` is the file name without extension, prefixed by its parent folder name when
  two scans share a file name.
- ``manifest.csv``: one row per scan, columns :data:`MANIFEST_COLUMNS`. ``source`` and
  ``labels_source`` are absolute input paths; ``image`` and ``labels`` are file names
  relative to the manifest's folder (empty when the scan failed). ``affine_ncc_before`` /
  ``affine_ncc_after``: global NCC with the atlas on the target grid, of the scan as it lies
  in world space and after the affine alignment. ``status`` is ``ok`` or ``failed`` (then
  ``error`` holds the one-line :class:`~voxreg.errors.VoxregError` message).
- ``summary.png``: the middle axial slice of the target grid (same plane for all, shown as
  :func:`voxreg.viz.registration_figure.display_planes` orients it) of the atlas and of every scan, with the
  atlas outline drawn on top.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from voxreg import io, losses
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.io import templates
from voxreg.io.tables import write_table
from voxreg.registration.affine import AffineConfig, affine_register
from voxreg.registration.pipeline import warp_image
from voxreg.viz.training import summary_figure, summary_plane, summary_slice

PathLike = str | os.PathLike
ProgressCallback = Callable[[int, int], None]

MANIFEST_COLUMNS = (
    "source",
    "labels_source",
    "image",
    "labels",
    "status",
    "error",
    "affine_ncc_before",
    "affine_ncc_after",
    "seconds",
)
_FOREGROUND = 0.1  # normalised atlas intensity above which a voxel is inside the outline
_OUTLINE_SIGMA = 1.0  # Gaussian smoothing (grid voxels) of the atlas mask before contouring
_MAX_PANELS = 48  # summary.png shows at most this many scans
#: largest target grid (voxels): 1e9 float32 voxels are 4 GB per scan, and resampling needs
#: several times that
MAX_GRID_VOXELS = 1_000_000_000


@dataclass
class ScanRecord:
    """Outcome for one scan (one manifest row). ``image``/``labels`` are the written
    files (None when not written); NCC values are NaN when the scan failed."""

    source: Path
    labels_source: Path | None
    image: Path | None
    labels: Path | None
    status: str
    error: str
    affine_ncc_before: float
    affine_ncc_after: float
    seconds: float


@dataclass
class PreprocessResult:
    """What :func:`preprocess` produced: the target ``grid`` (zeros), one record per scan
    (input order), and the paths of ``manifest.csv`` and ``summary.png``."""

    grid: Image
    outputs: list[ScanRecord]
    manifest: Path
    summary: Path


# --------------------------------------------------------------------------- grid


def nearest_multiple(size: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``size`` (ties up), at least ``multiple``."""
    return max(multiple, int(math.floor(size / multiple + 0.5)) * multiple)


def _grid_centre(image: Image) -> np.ndarray:
    """World point (RAS mm, length 3) of the centre of ``image``'s grid."""
    index = np.zeros(4)
    index[: image.ndim] = (np.asarray(image.shape, dtype=np.float64) - 1.0) / 2.0
    index[3] = 1.0
    return (image.affine @ index)[:3]


def network_grid(atlas: Image, spacing: float | None = None, multiple: int = 16) -> Image:
    """Target grid: ``atlas``'s grid resampled to ``spacing`` mm (isotropic; None keeps the
    atlas voxel size) and cropped/padded symmetrically so each axis is a multiple of
    ``multiple``. Same orientation and world centre as the atlas; returns zeros (float32)."""
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise VoxregError(f"spacing must be a finite positive number of mm, got {spacing}")
    if int(multiple) != multiple or multiple < 1:
        raise VoxregError(f"multiple must be a positive integer, got {multiple}")
    ndim = atlas.ndim
    old = atlas.spacing
    new = old if spacing is None else np.full(ndim, float(spacing))
    extent = np.asarray(atlas.shape, dtype=np.float64) * old
    sizes = [max(e / s, 1.0) for e, s in zip(extent, new)]
    voxels = math.prod(sizes)
    if voxels > MAX_GRID_VOXELS:  # estimated before anything is allocated
        text = "x".join(f"{s:.0f}" for s in sizes)
        raise VoxregError(
            f"spacing {spacing} mm gives a {text} output grid ({voxels:.2g} voxels, more than "
            f"{MAX_GRID_VOXELS:.0e}); use a larger --spacing"
        )
    shape = tuple(nearest_multiple(max(round(e / s), 1), int(multiple)) for e, s in zip(extent, new))
    affine = atlas.affine.copy()
    affine[:3, :ndim] = atlas.affine[:3, :ndim] / old * new
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = _grid_centre(atlas) - affine[:3, :ndim] @ half
    return Image(np.zeros(shape, dtype=np.float32), affine)


# --------------------------------------------------------------------------- inputs


def load_atlas(atlas: PathLike | Image, spacing: float | None = None) -> Image:
    """The atlas image: an Image, a file, or ``'mni152'`` (MNI152 T1 shipped in the
    nilearn wheel: the 2 mm version when ``spacing >= 2``, else 1 mm)."""
    if isinstance(atlas, Image):
        image = atlas
    elif isinstance(atlas, str) and atlas.strip().lower() == "mni152":
        image = templates.mni152_template(2 if spacing is not None and spacing >= 2 else 1)
    else:
        image = io.load_image(atlas)
    io.check_intensity_image(image)
    return image


def _stem(path: Path) -> str:
    """File name of ``path`` without its image extension (``.nii.gz`` counts as one); other
    names (e.g. DICOM folders such as ``1.2.840``) are kept whole."""
    return io.strip_extension(path) if path.name.lower().endswith(io.READABLE_EXTS) else path.name


def output_names(scans: Sequence[PathLike]) -> list[str]:
    """Unique output names: the file name without extension, prefixed by the parent folder
    name where names collide, then numbered if they still do."""
    paths = [Path(p) for p in scans]
    stems = [_stem(p) for p in paths]
    names = [f"{p.parent.name}_{s}" if stems.count(s) > 1 and p.parent.name else s for p, s in zip(paths, stems)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if names.count(name) == 1 else f"{name}_{count + 1}")
    return unique


def _check_options(
    scans: Sequence[PathLike],
    labels: Sequence[PathLike | None] | None,
    window: tuple[float, float] | None,
    low_pct: float,
    high_pct: float,
    similarity: str,
) -> AffineConfig:
    """Validate the arguments shared by every scan; returns the affine configuration."""
    if not scans:
        raise VoxregError("no scans given: pass at least one scan to preprocess")
    if labels is not None and len(labels) != len(scans):
        raise VoxregError(
            f"labels has {len(labels)} entries for {len(scans)} scans: give one per "
            "scan (None where a scan has no label map)"
        )
    if window is not None and (
        len(window) != 2 or not all(math.isfinite(float(v)) for v in window) or not float(window[1]) > float(window[0])
    ):
        raise VoxregError(f"window must be two finite numbers (low, high) with low < high, got {tuple(window)}")
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise VoxregError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}")
    try:
        return AffineConfig(similarity=similarity)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None


# --------------------------------------------------------------------------- one scan


@dataclass
class _Options:
    """Settings of the per-scan work."""

    atlas: Image
    grid: Image
    atlas_on_grid: np.ndarray  # atlas normalised to [0, 1] on the target grid
    output: Path
    config: AffineConfig
    mask_labels: bool
    window: tuple[float, float] | None
    low_pct: float
    high_pct: float


def _global_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Global NCC (Pearson correlation) of two arrays of one shape."""
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None] for x in (a, b))
    return float(losses.global_ncc(ta, tb))


def _load_labels(path: PathLike | None, scan: Image) -> Image | None:
    """The scan's label map (integer), checked to have the scan's dimensionality."""
    if path is None:
        return None
    labels = io.load_image(path, label=True)
    if labels.ndim != scan.ndim:
        raise VoxregError(f"{path}: label map is {labels.ndim}D but the scan {scan.path} is {scan.ndim}D")
    return labels


def _masked(scan: Image, labels: Image | None, mask: bool) -> Image:
    """``scan`` (normalised) with voxels outside ``labels > 0`` zeroed when ``mask``."""
    if not mask or labels is None:
        return scan
    on_scan = labels
    if labels.shape != scan.shape or not np.allclose(labels.affine, scan.affine, atol=1e-4):
        on_scan = warp_image(labels, scan)
    masked = scan.with_array(np.where(on_scan.array > 0, scan.array, 0).astype(np.float32))
    if not np.any(masked.array):
        raise VoxregError(
            f"{labels.path}: label map does not overlap the scan {scan.path} (nothing left after masking)"
        )
    return masked


def _align_scan(
    scan: Image, labels: Image | None, opts: _Options
) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """Aligned intensities in [0, 1] and labels on the target grid, and NCC before/after.
    The scan is normalised (and masked) first; that image is aligned and resampled."""
    scaled = scan.with_array(io.normalize_intensity(scan.array, opts.low_pct, opts.high_pct, opts.window))
    scaled = _masked(scaled, labels, opts.mask_labels)
    world = affine_register(opts.atlas, scaled, opts.config).world_matrix
    before = warp_image(scaled, opts.grid).array
    image = np.clip(warp_image(scaled, opts.grid, world_matrix=world).array, 0.0, 1.0)
    warped_labels = None if labels is None else warp_image(labels, opts.grid, world_matrix=world).array
    if opts.mask_labels and warped_labels is not None:
        image = np.where(warped_labels > 0, image, 0).astype(np.float32)
    ncc_before = _global_ncc(opts.atlas_on_grid, before)
    return image, warped_labels, ncc_before, _global_ncc(opts.atlas_on_grid, image)


def _save_outputs(name: str, image: np.ndarray, labels: np.ndarray | None, opts: _Options) -> tuple[Path, Path | None]:
    """Write ``<name>.nii.gz`` (and ``<name>_labels.nii.gz``) on the grid; on a failure no
    file of this scan is left behind."""
    image_path = io.save_image(opts.grid.with_array(image), opts.output / f"{name}.nii.gz")
    if labels is None:
        return image_path, None
    try:
        return image_path, io.save_image(opts.grid.with_array(labels), opts.output / f"{name}_labels.nii.gz")
    except BaseException:
        image_path.unlink(missing_ok=True)
        raise


def _process_scan(
    name: str, source: PathLike, labels_source: PathLike | None, opts: _Options
) -> tuple[ScanRecord, np.ndarray | None]:
    """Preprocess one scan; a VoxregError gives a 'failed' record instead of raising.
    Also returns the aligned volume (None when failed) for the summary."""
    start = time.perf_counter()
    source = Path(os.path.abspath(source))
    labels_path = None if labels_source is None else Path(os.path.abspath(labels_source))
    try:
        scan = io.load_image(source)
        io.check_intensity_image(scan)
        labels = _load_labels(labels_path, scan)
        image, warped_labels, before, after = _align_scan(scan, labels, opts)
        image_path, out_labels = _save_outputs(name, image, warped_labels, opts)
    except (VoxregError, MemoryError) as exc:
        reason = str(exc) if isinstance(exc, VoxregError) else f"{source}: out of memory"
        record = ScanRecord(
            source,
            labels_path,
            None,
            None,
            "failed",
            " ".join(reason.split()),
            math.nan,
            math.nan,
            time.perf_counter() - start,
        )
        return record, None
    record = ScanRecord(
        source, labels_path, image_path, out_labels, "ok", "", before, after, time.perf_counter() - start
    )
    return record, image


# --------------------------------------------------------------------------- manifest


def _csv_value(value: object) -> str:
    """Manifest cell text: empty for None/NaN, 6 significant digits for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_manifest(records: Sequence[ScanRecord], path: PathLike) -> Path:
    """Write ``records`` as CSV (:data:`MANIFEST_COLUMNS`) atomically; output files are
    written relative to the manifest's folder."""
    path = Path(path)
    rows = []
    for record in records:
        row = {f.name: getattr(record, f.name) for f in fields(record)}
        for key in ("image", "labels"):
            if row[key] is not None:
                row[key] = os.path.relpath(row[key], path.parent)
        rows.append({column: _csv_value(row[column]) for column in MANIFEST_COLUMNS})
    return write_table(path, MANIFEST_COLUMNS, rows)


# --------------------------------------------------------------------------- summary


def atlas_outline(atlas_on_grid: np.ndarray) -> np.ndarray:
    """Smoothed foreground mask (float in [0, 1]) of the normalised atlas (a slice or a
    volume), holes filled: contour it at 0.5 for the atlas outline."""
    mask = ndimage.binary_fill_holes(atlas_on_grid > _FOREGROUND)
    return ndimage.gaussian_filter(mask.astype(np.float32), _OUTLINE_SIGMA)


# --------------------------------------------------------------------------- entry point


def _process_all(
    scans: Sequence[PathLike], labels: Sequence[PathLike | None], opts: _Options, progress: ProgressCallback | None
) -> tuple[list[ScanRecord], list[tuple[str, np.ndarray | None]]]:
    """Run every scan; returns the records and the summary slices (atlas first)."""
    plane = summary_plane(opts.grid)
    records: list[ScanRecord] = []
    slices: list[tuple[str, np.ndarray | None]] = [("atlas", summary_slice(opts.atlas_on_grid, plane))]
    if progress is not None:
        progress(0, len(scans))
    for index, (name, scan, lab) in enumerate(zip(output_names(scans), scans, labels)):
        record, image = _process_scan(name, scan, lab, opts)
        records.append(record)
        if len(slices) <= _MAX_PANELS:
            slices.append(
                (
                    name if image is not None else f"{name} (failed)",
                    None if image is None else summary_slice(image, plane),
                )
            )
        if progress is not None:
            progress(index + 1, len(scans))
    return records, slices


def preprocess(
    scans: Sequence[PathLike],
    output: PathLike,
    atlas: PathLike | Image = "mni152",
    labels: Sequence[PathLike | None] | None = None,
    mask_labels: bool = False,
    spacing: float | None = None,
    multiple: int = 16,
    window: tuple[float, float] | None = None,
    low_pct: float = 0.5,
    high_pct: float = 99.5,
    similarity: str = "ncc",
    progress: ProgressCallback | None = None,
) -> PreprocessResult:
    """Align ``scans`` (and their ``labels``, one entry per scan or None) to ``atlas`` and write
    them on one network-friendly grid into ``output``, with ``manifest.csv`` and ``summary.png``.

    ``atlas``: a file, an Image, or ``'mni152'``. ``spacing`` (mm, isotropic) defaults to the
    atlas voxel size; every axis is cropped/padded to a multiple of ``multiple``. Intensities
    are scaled to [0, 1] by the ``low_pct``/``high_pct`` percentiles or clipped to ``window``
    (e.g. CT HU). ``similarity`` ('ncc' or 'mi') drives the affine alignment.
    ``mask_labels`` zeroes intensities outside ``labels > 0`` (scans without a label map are
    left unmasked). A scan that fails with a VoxregError is recorded as failed; the others go on.
    When every scan fails nothing is written (an output folder created here is removed) and a
    VoxregError summarising the failures is raised.
    ``progress(done, total)`` is called once per scan (and with 0 before the first).
    """
    config = _check_options(scans, labels, window, low_pct, high_pct, similarity)
    atlas_img = load_atlas(atlas, spacing)
    grid = network_grid(atlas_img, spacing, multiple)
    created = not Path(output).exists()
    out_dir = io.ensure_output_dir(output)
    atlas_on_grid = io.normalize_intensity(warp_image(atlas_img, grid).array)
    opts = _Options(
        atlas_img,
        grid,
        atlas_on_grid,
        out_dir,
        config,
        mask_labels,
        None if window is None else (float(window[0]), float(window[1])),
        low_pct,
        high_pct,
    )
    label_list = list(labels) if labels is not None else [None] * len(scans)
    records, slices = _process_all(scans, label_list, opts, progress)
    if not any(record.status == "ok" for record in records):
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty: nothing was written
        raise VoxregError(
            f"all {len(records)} scans failed, nothing written (first: {records[0].error})"
            if len(records) > 1
            else records[0].error
        )
    manifest = write_manifest(records, out_dir / "manifest.csv")
    plane = summary_plane(grid)
    outline = atlas_outline(summary_slice(atlas_on_grid, plane))
    note = f" (first {_MAX_PANELS} of {len(scans)} scans)" if len(scans) > _MAX_PANELS else ""
    summary = summary_figure(slices, outline, grid, out_dir / "summary.png", note)
    return PreprocessResult(grid, records, manifest, summary)
