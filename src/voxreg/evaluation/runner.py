"""Evaluate registration methods over a CSV of pairs (``voxreg evaluate``), VoxelMorph
Table-1 style, side by side with ANTs SyN.

Pairs CSV: a header row with ``fixed,moving`` (required) and optionally ``fixed_labels``,
``moving_labels``, ``fixed_landmarks``, ``moving_landmarks`` and ``id``; relative paths are
resolved against the CSV's folder; the default id is ``<moving stem>_to_<fixed stem>``.
Landmark files are CSVs with header ``x,y,z`` in world RAS mm (nibabel convention), the same
number of rows on both sides (row ``i`` of the fixed file corresponds to row ``i`` of the moving).

Methods (:data:`METHODS`): ``affine`` (voxreg affine stage only), ``instance`` (affine +
instance optimisation), ``network`` / ``network-refine`` (affine + a checkpoint, + N refinement
steps) and ``ants-syn`` (``ants.registration(type_of_transform="SyN")`` with antspyx defaults).
Every method gives the same :class:`MethodOutput`, and one code path computes the metrics:

- Dice per label (labels in both label maps, minus ``exclude_labels``, optionally restricted to
  a :func:`voxreg.labels.preset`) and HD95 in mm (symmetric, surface voxels by face
  connectivity, as MONAI's ``compute_hausdorff_distance(percentile=95)``);
- % folding and SD of log-Jacobian of the deformable field (voxels of the fixed grid; the
  ANTs ``*Warp.nii.gz`` is converted from LPS mm), 0 for ``affine``;
- global NCC and MI (nats, 32 bins) on the fixed grid between the fixed scan and the moving scan
  mapped by the identity world transform (before) / warped (after); both images are scaled to
  [0, 1] by robust percentiles, the moving one with the same window before and after;
- TRE in mm: mean distance between the moving landmarks and the fixed landmarks mapped into the
  moving scan's world by the method's transform (before: the raw coordinates);
- seconds, peak memory (resident set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), device,
  threads and the method's exact settings (JSON).

Outputs in ``outdir``: ``results.csv`` (:data:`RESULT_COLUMNS`, one row per pair and method;
the last column ``dice_before`` is the mean Dice of the moving labels mapped by the identity world
transform, over the same labels), ``per_structure.csv`` (:data:`STRUCTURE_COLUMNS`),
``examples/<id>_<method>.png`` and, when :mod:`voxreg.evaluation_report` is available, its report. Both CSVs
are rewritten to a temporary name and renamed after every finished row, so an interrupted run
leaves complete files; rerunning skips (id, method) rows already ``ok`` and retries failed ones.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import resource
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from voxreg import io, metrics
from voxreg.core.errors import VoxregError, one_line, short_reason
from voxreg.core.image import Image

PathLike = str | os.PathLike
Row = dict[str, Any]
ProgressCallback = Callable[[int, int, Row], None]

RESULT_COLUMNS = ("id", "fixed", "moving", "method", "status", "error", "dice_mean", "dice_std",
                  "hd95_mean_mm", "folding_percent", "sdlogj", "ncc_before", "ncc_after", "mi_before",
                  "mi_after", "tre_before_mm", "tre_after_mm", "seconds", "peak_memory_mb", "device",
                  "threads", "settings", "dice_before")
STRUCTURE_COLUMNS = ("id", "method", "label", "name", "dice", "hd95_mm")
PAIR_COLUMNS = ("id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks",
                "moving_landmarks")
DEFAULT_METHODS = ("affine", "ants-syn", "instance")
MODEL_METHODS = ("network", "network-refine")
CPU_METHODS = frozenset({"ants-syn"})  # run on CPU whatever --device says
ANTS_MISSING = "ANTs SyN needs antspyx: pip install 'voxreg[ants]'"

_HD_MARGIN = 2  # voxels of background kept around each structure's bounding box
_MEMORY_POLL_S = 0.02


# --------------------------------------------------------------------------- pairs CSV


@dataclass(frozen=True)
class Pair:
    """One row of the pairs CSV, with absolute paths (None when a column is empty)."""

    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None


def read_pairs(path: PathLike) -> list[Pair]:
    """Parse and check a pairs CSV (files exist, labels/landmarks given on both sides,
    landmark files readable with matching row counts, unique ids)."""
    path = Path(path)
    rows = _read_csv_rows(path)
    pairs = [_pair_from_row(row, line, path) for line, row in rows]
    seen: dict[str, int] = {}
    for (line, _), pair in zip(rows, pairs):
        if pair.id in seen:
            raise VoxregError(f"{path}: line {line}: id '{pair.id}' already used on line {seen[pair.id]}")
        seen[pair.id] = line
    return pairs


def _read_csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header holding at least ``fixed`` and ``moving``."""
    if not path.is_file():
        raise VoxregError(f"{path}: pairs CSV not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VoxregError(f"{path}: cannot read as CSV ({short_reason(exc)})") from exc
    missing = [c for c in ("fixed", "moving") if c not in header]
    if missing:
        raise VoxregError(f"{path}: header must name the columns fixed,moving (missing {', '.join(missing)}; "
                          f"found {', '.join(header) or 'nothing'})")
    unknown = [c for c in header if c and c not in PAIR_COLUMNS]
    if unknown:
        raise VoxregError(f"{path}: unknown column(s) {', '.join(unknown)} (allowed: {', '.join(PAIR_COLUMNS)})")
    if not rows:
        raise VoxregError(f"{path}: no pairs (only a header)")
    return rows


def _pair_from_row(row: Mapping[str, str | None], line: int, csv_path: Path) -> Pair:
    """A :class:`Pair` from one CSV row; paths resolved against the CSV's folder."""
    if None in row:
        raise VoxregError(f"{csv_path}: line {line}: more values than header columns")
    values = {k: (row.get(k) or "").strip() for k in PAIR_COLUMNS}
    paths: dict[str, Path | None] = {}
    for column in PAIR_COLUMNS[1:]:
        paths[column] = _resolve(values[column], column, line, csv_path)
    for column in ("fixed", "moving"):
        if paths[column] is None:
            raise VoxregError(f"{csv_path}: line {line}: empty '{column}' path")
    for kind in ("labels", "landmarks"):
        given = [paths[f"fixed_{kind}"] is not None, paths[f"moving_{kind}"] is not None]
        if given[0] != given[1]:
            raise VoxregError(f"{csv_path}: line {line}: fixed_{kind} and moving_{kind} must be given together")
    pair_id = values["id"] or f"{_stem(paths['moving'])}_to_{_stem(paths['fixed'])}"
    pair = Pair(pair_id, **paths)
    if pair.fixed_landmarks is not None:
        fixed_points, moving_points = read_landmarks(pair.fixed_landmarks), read_landmarks(pair.moving_landmarks)
        if len(fixed_points) != len(moving_points):
            raise VoxregError(f"{csv_path}: line {line}: {pair.fixed_landmarks} has {len(fixed_points)} landmarks "
                              f"but {pair.moving_landmarks} has {len(moving_points)}")
    return pair


def _resolve(value: str, column: str, line: int, csv_path: Path) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.exists():
        raise VoxregError(f"{csv_path}: line {line}: {column} file not found: {path}")
    return path


def _stem(path: Path) -> str:
    return Image(np.zeros((1, 1)), path=path).name


def read_landmarks(path: PathLike) -> np.ndarray:
    """Landmarks ``(n, 3)`` float64 (world RAS mm) from a CSV with header ``x,y,z``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            if not {"x", "y", "z"} <= set(header):
                raise VoxregError(f"{path}: landmark CSV needs a header with x,y,z (found {','.join(header) or 'nothing'})")
            points = [[float(row[c]) for c in "xyz"] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VoxregError(f"{path}: cannot read landmark CSV ({short_reason(exc)})") from exc
    except (TypeError, ValueError) as exc:
        raise VoxregError(f"{path}: landmark coordinates must be numbers ({exc})") from exc
    array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not array.size:
        raise VoxregError(f"{path}: no landmarks")
    if not np.all(np.isfinite(array)):
        raise VoxregError(f"{path}: landmark coordinates must be finite")
    return array


# --------------------------------------------------------------------------- method interface


@dataclass
class EvaluationOptions:
    """Settings shared by the methods of one evaluation."""

    model: Path | None = None
    refine: int = 50
    lam: float | None = None
    similarity: str = "ncc"
    device: torch.device = dataclass_field(default_factory=lambda: torch.device("cpu"))
    ants_threads: int | None = None
    iterations: tuple[int, ...] | None = None


@dataclass
class PairData:
    """A loaded pair: images, label maps (fixed labels on the fixed grid) and landmarks."""

    pair: Pair
    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    before: "_Before | None" = None  # the unregistered pair's measures, computed once


@dataclass
class _Before:
    """What every method of a pair is compared against: the intensity scaling, the
    normalised fixed scan and the measures of the unregistered pair (identity mapping)."""

    scale: "_IntensityScale"
    fixed_normalized: np.ndarray
    row: Row


@dataclass
class MethodOutput:
    """What a method returns: the warped scan (and labels) on the fixed grid, its deformable
    field ``(ndim, *S)`` in fixed voxels, a map of fixed world points to moving world points
    (RAS mm, ``(n, 3)``), its runtime and settings."""

    warped: Image
    field: np.ndarray
    map_points: Callable[[np.ndarray], np.ndarray]
    seconds: float
    warped_labels: Image | None = None
    device: str = "cpu"
    threads: int = 1
    settings: dict[str, Any] = dataclass_field(default_factory=dict)


MethodRunner = Callable[[PairData, EvaluationOptions], MethodOutput]


def load_pair(pair: Pair) -> PairData:
    """Load a pair's images, label maps and landmarks (fixed labels resampled onto the
    fixed grid with nearest neighbour when their grid differs)."""
    from voxreg.registration.pipeline import as_image

    fixed, moving = as_image(pair.fixed), as_image(pair.moving)
    if fixed.ndim != moving.ndim:
        raise VoxregError(f"{pair.moving} is {moving.ndim}D but {pair.fixed} is {fixed.ndim}D")
    data = PairData(pair, fixed, moving)
    if pair.fixed_labels is not None:
        data.fixed_labels = io.resample_to(as_image(pair.fixed_labels, label=True), fixed, nearest=True)
        data.moving_labels = as_image(pair.moving_labels, label=True)
    if pair.fixed_landmarks is not None:
        data.fixed_points = read_landmarks(pair.fixed_landmarks)
        data.moving_points = read_landmarks(pair.moving_landmarks)
    return data


# --------------------------------------------------------------------------- voxreg methods


def map_points(points: np.ndarray, fixed_affine: np.ndarray, field: np.ndarray,
               world_matrix: np.ndarray | None = None) -> np.ndarray:
    """Map fixed world points ``(n, 3)`` (RAS mm) to moving world points through voxreg's
    composite: the field (fixed voxels, linear interpolation, edge values outside) first,
    then the world matrix (fixed world -> moving world)."""
    ndim = field.shape[0]
    voxels = _apply_affine(np.linalg.inv(fixed_affine), points)
    coords = voxels[:, :ndim].T
    displacement = np.stack([ndimage.map_coordinates(np.asarray(field[d], np.float64), coords, order=1,
                                                     mode="nearest") for d in range(ndim)], axis=1)
    voxels[:, :ndim] += displacement
    world = _apply_affine(fixed_affine, voxels)
    return world if world_matrix is None else _apply_affine(world_matrix, world)


def _apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]


def _align_config(options: EvaluationOptions) -> Any:
    """AlignConfig for instance optimisation / refinement (``iterations`` per pyramid level,
    scales 2^(k-1) .. 1)."""
    from voxreg.registration.instance import AlignConfig

    kwargs: dict[str, Any] = {"similarity": options.similarity, "lam": options.lam}
    if options.iterations:
        kwargs["iterations"] = tuple(options.iterations)
        kwargs["scales"] = tuple(2 ** i for i in reversed(range(len(options.iterations))))
    try:
        return AlignConfig(**kwargs)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None


def _run_voxreg(data: PairData, options: EvaluationOptions, **kwargs: Any) -> MethodOutput:
    """One ``voxreg.registration.pipeline.register`` call turned into a :class:`MethodOutput`."""
    from voxreg.registration import pipeline as api

    labels = {"labels": data.moving_labels} if data.moving_labels is not None else None
    result = api.register(data.fixed, data.moving, moving_labels=labels, device=options.device, **kwargs)
    field = result.field[0].numpy()
    fixed_affine, world_matrix = data.fixed.affine, result.world_matrix
    settings = {"engine": result.metrics["engine"], "affine": "voxreg.affine defaults",
                "seconds": "api.register pipeline_seconds (input normalisation, affine, deformable, "
                           "warping the moving scan; not the metrics)",
                "torch": torch.__version__, **_jsonable_kwargs(kwargs)}
    return MethodOutput(
        warped=result.warped, field=field, seconds=float(result.metrics["pipeline_seconds"]),
        map_points=lambda points: map_points(points, fixed_affine, field, world_matrix),
        warped_labels=result.warped_labels.get("labels"), device=_device_name(options.device),
        threads=torch.get_num_threads(), settings=settings)


def _jsonable_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "config":
            out["align_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}
        else:
            out[key] = str(value) if isinstance(value, Path) else value
    return out


def run_affine(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """voxreg's affine stage only (``register(affine_only=True)``)."""
    return _run_voxreg(data, options, affine_only=True)


def run_instance(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + instance optimisation (``--similarity``, ``--lambda``, ``--iterations``)."""
    return _run_voxreg(data, options, config=_align_config(options))


def run_network(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + one forward pass of the checkpoint ``options.model``."""
    return _run_voxreg(data, options, model=_require_model(options), lam=options.lam,
                       config=_align_config(options))


def run_network_refine(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + the network + ``options.refine`` instance-optimisation steps."""
    return _run_voxreg(data, options, model=_require_model(options), lam=options.lam,
                       refine=options.refine, config=_align_config(options))


def _require_model(options: EvaluationOptions) -> Path:
    if options.model is None:
        raise VoxregError("methods network and network-refine need --model CHECKPOINT")
    return options.model


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------- ANTs SyN


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
        raise VoxregError(f"{image.path or 'image'}: ANTs needs a 2D image parallel to the x-y plane; this one is tilted")
    lps = io.RAS_TO_LPS @ image.affine
    matrix = lps[:ndim, :ndim]
    spacing = np.sqrt((matrix ** 2).sum(axis=0))
    return ants.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32), origin=lps[:ndim, 3].tolist(),
                           spacing=spacing.tolist(), direction=matrix / spacing)


def ants_field_to_voxels(displacement: np.ndarray, fixed: Image) -> np.ndarray:
    """Convert an ITK/ANTs displacement ``(*S, ndim)`` in LPS mm on ``fixed``'s grid to
    voxreg's field ``(ndim, *S)`` in fixed voxels (the inverse of
    :func:`voxreg.io.field_to_itk_image`)."""
    ndim = fixed.ndim
    if displacement.shape != (*fixed.shape, ndim):
        raise VoxregError(f"ANTs warp field of shape {displacement.shape} is not on the fixed grid "
                          f"{(*fixed.shape, ndim)}")
    linear = (io.RAS_TO_LPS[:3, :3] @ fixed.affine[:3, :ndim])[:ndim]
    field = np.einsum("ij,...j->i...", np.linalg.inv(linear), displacement.astype(np.float64))
    return np.ascontiguousarray(field, dtype=np.float32)


def ants_map_points(points: np.ndarray, transforms: Sequence[str], ndim: int, ants: Any) -> np.ndarray:
    """Map fixed world points ``(n, 3)`` (RAS mm) to moving world points with
    ``ants.apply_transforms_to_points`` and the registration's ``fwdtransforms`` (points
    move opposite to images: the forward list maps fixed points into the moving scan)."""
    import pandas as pd

    lps = np.asarray(points, dtype=np.float64) * [-1.0, -1.0, 1.0]
    columns = list("xyz")[:ndim]
    frame = pd.DataFrame(lps[:, :ndim], columns=columns)
    mapped = ants.apply_transforms_to_points(ndim, frame, list(transforms))[columns].to_numpy(np.float64)
    out = lps.copy()
    out[:, :ndim] = mapped
    return out * [-1.0, -1.0, 1.0]


def ants_settings(ants: Any, threads: int) -> dict[str, Any]:
    """The exact settings of ``ants.registration(type_of_transform="SyN")`` (antspyx defaults,
    read from its signature) and of this run."""
    import importlib.metadata
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(ants.registration).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in ("outprefix", "verbose")}
    syn = f"SyN[{defaults.get('grad_step')},{defaults.get('flow_sigma')},{defaults.get('total_sigma')}]"
    iterations = "x".join(str(i) for i in defaults.get("reg_iterations", ()))
    return {
        "call": "ants.registration(fixed, moving, type_of_transform='SyN')",
        "type_of_transform": "SyN", "antspyx": importlib.metadata.version("antspyx"),
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
    with tempfile.TemporaryDirectory(prefix="voxreg-ants-") as tmp, _environment(
            ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads)):
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
            labels = ants.apply_transforms(fixed_ants, to_ants_image(data.moving_labels, ants), transforms,
                                           interpolator="genericLabel")
            warped_labels = Image(np.rint(labels.numpy()).astype(np.int32), data.fixed.affine.copy())
        mapped = None
        if data.fixed_points is not None:
            mapped = ants_map_points(data.fixed_points, transforms, data.fixed.ndim, ants)
    warped = Image(reg["warpedmovout"].numpy().astype(np.float32), data.fixed.affine.copy())
    return MethodOutput(warped=warped, field=field, seconds=seconds, warped_labels=warped_labels,
                        map_points=lambda points: _precomputed(points, data.fixed_points, mapped),
                        device="cpu", threads=threads, settings=ants_settings(ants, threads))


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


METHODS: dict[str, MethodRunner] = {
    "affine": run_affine,
    "instance": run_instance,
    "network": run_network,
    "network-refine": run_network_refine,
    "ants-syn": run_ants_syn,
}


# --------------------------------------------------------------------------- metrics


def hd95(fixed_mask: np.ndarray, warped_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two binary masks on one
    grid with voxel ``spacing`` (mm per array axis): max of the two directed 95th percentiles
    of surface-voxel to nearest-surface-voxel distances (MONAI's definition; surfaces by face
    connectivity). NaN when either mask is empty; 0 for identical masks."""
    import SimpleITK as sitk

    a, b = np.asarray(fixed_mask, bool), np.asarray(warped_mask, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return float("nan")
    box = _bounding_box(a | b, _HD_MARGIN)
    a, b = np.pad(a[box], 1), np.pad(b[box], 1)  # zero border: structures at the edge get a surface
    surface_a, surface_b = _surface(a, spacing, sitk), _surface(b, spacing, sitk)
    to_b = _distance_to(surface_b, spacing, sitk)[surface_a]
    to_a = _distance_to(surface_a, spacing, sitk)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def _to_sitk(mask: np.ndarray, spacing: Sequence[float], sitk: Any) -> Any:
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).T))  # array axis 0 = ITK x
    image.SetSpacing([float(s) for s in spacing])
    return image


def _surface(mask: np.ndarray, spacing: Sequence[float], sitk: Any) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it."""
    contour = sitk.LabelContour(_to_sitk(mask, spacing, sitk), fullyConnected=False, backgroundValue=0)
    return sitk.GetArrayFromImage(contour).T.astype(bool)


def _distance_to(surface: np.ndarray, spacing: Sequence[float], sitk: Any) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``surface``."""
    distance = sitk.SignedMaurerDistanceMap(_to_sitk(surface, spacing, sitk), insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    values = np.abs(sitk.GetArrayFromImage(distance).T)
    values[surface] = 0.0
    return values


def structure_scores(fixed_labels: np.ndarray, warped_labels: np.ndarray, labels: Sequence[int],
                     spacing: Sequence[float]) -> dict[int, tuple[float, float]]:
    """``{label: (dice, hd95_mm)}`` for each label (Dice from :func:`voxreg.metrics.dice_per_label`,
    HD95 from :func:`hd95` on each structure's bounding box, found for all labels in one pass)."""
    fixed_labels, warped_labels = np.asarray(fixed_labels), np.asarray(warped_labels)
    dice = metrics.dice_per_label(fixed_labels, warped_labels, labels)
    fixed_boxes, warped_boxes = _label_boxes(fixed_labels, labels), _label_boxes(warped_labels, labels)
    scores = {}
    for label in (int(v) for v in labels):
        boxes = [b for b in (fixed_boxes.get(label), warped_boxes.get(label)) if b is not None]
        if len(boxes) < 2:  # absent on one side
            scores[label] = (dice[label], float("nan"))
            continue
        box = tuple(slice(max(min(a.start, b.start) - _HD_MARGIN, 0), max(a.stop, b.stop) + _HD_MARGIN)
                    for a, b in zip(*boxes))
        scores[label] = (dice[label], hd95(fixed_labels[box] == label, warped_labels[box] == label, spacing))
    return scores


def _label_boxes(array: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each of ``labels`` present in ``array`` (positive codes below 2^20 in
    one ``find_objects`` pass, any others one by one)."""
    fast = [int(v) for v in labels if 0 < int(v) < 1 << 20]
    found: dict[int, tuple[slice, ...]] = {}
    if fast:
        top = max(fast)
        codes = np.where((array > 0) & (array <= top), array, 0).astype(np.int32, copy=False)
        boxes = ndimage.find_objects(codes, max_label=top)
        found.update({label: boxes[label - 1] for label in fast if boxes[label - 1] is not None})
    for label in (int(v) for v in labels if not 0 < int(v) < 1 << 20):
        mask = array == label
        if mask.any():
            found[label] = ndimage.find_objects(mask.astype(np.uint8))[0]
    return found


def structure_table(structures: str) -> dict[int, str] | None:
    """Code -> name of the scored structures: None for ``"all"`` (FreeSurfer names), a
    :func:`voxreg.labels.preset` name, or the path of a label table file (FreeSurfer LUT or
    ``code,name`` CSV, e.g. TotalSegmentator's labels.csv)."""
    from voxreg.io.labels import label_table, preset

    if structures.strip().lower() == "all":
        return None
    if Path(structures).is_file():
        return label_table(structures)
    return preset(structures)


def select_labels(fixed_labels: np.ndarray, moving_labels: np.ndarray, structures: str = "all",
                  exclude: Iterable[int] = (0,)) -> list[int]:
    """Labels present in both maps, minus ``exclude``, restricted to :func:`structure_table`
    ``structures`` unless it is ``"all"``."""
    labels = set(np.unique(fixed_labels).tolist()) & set(np.unique(moving_labels).tolist())
    labels -= {int(v) for v in exclude}
    table = structure_table(structures)
    if table is not None:
        labels &= set(table)
    return sorted(int(v) for v in labels)


class _IntensityScale:
    """[0, 1] scaling of the moving scan by its own robust range, the same before and after."""

    def __init__(self, moving: Image) -> None:
        self.window = io.robust_range(np.asarray(moving.array, np.float32), 0.5, 99.5)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        low, high = self.window
        if not high > low:
            return np.zeros_like(array, dtype=np.float32)
        return io.normalize_intensity(array, window=(low, high))


def global_similarity(fixed: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(global NCC, MI in nats) of two [0, 1] images on one grid (voxreg.metrics.similarities)."""
    values = metrics.similarities(fixed, other)
    return values["ncc"], values["mi"]


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between corresponding rows of two ``(n, 3)`` arrays."""
    return float(np.mean(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)))


class PeakMemory:
    """Peak memory (MB) used inside a ``with`` block: CUDA peak allocation on a CUDA device,
    else the peak resident set (``/proc/self/status`` VmRSS polled every 20 ms) minus the
    resident set at entry, after freed memory is returned to the OS (``resource.getrusage``
    when /proc is absent)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import gc

        from voxreg.core.runtime import release_memory

        gc.collect()
        release_memory()  # freed blocks kept by an earlier method must not hide this one's use
        self._base = _resident_mb()
        self._peak = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self._base = _max_resident_mb()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(_MEMORY_POLL_S):
            self._peak = max(self._peak, _resident_mb() or 0.0)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _resident_mb() or 0.0)
            self.peak_mb = max(self._peak - self._base, 0.0)
        else:
            self.peak_mb = max(_max_resident_mb() - self._base, 0.0)


def _resident_mb() -> float | None:
    """Current resident set size in MB from /proc/self/status, None when unavailable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _max_resident_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2 ** 20 if os.uname().sysname == "Darwin" else usage / 1024.0


# --------------------------------------------------------------------------- one (pair, method)


def measure(data: PairData, output: MethodOutput, labels: Sequence[int],
            names: Mapping[int, str] | None = None) -> tuple[Row, list[Row]]:
    """The metric columns of one result row and its per-structure rows (without id/method);
    structure names from ``names`` (FreeSurfer names by default)."""
    from voxreg.io.labels import label_name

    reference = _before(data, labels)
    row: Row = dict(reference.row)
    row["ncc_after"], row["mi_after"] = global_similarity(reference.fixed_normalized,
                                                          reference.scale(output.warped.array))
    jacobian = metrics.jacobian_stats(output.field)
    row["folding_percent"], row["sdlogj"] = jacobian["folding_percent"], jacobian["log_jacobian_std"]
    structures: list[Row] = []
    if data.fixed_labels is not None and output.warped_labels is not None and labels:
        fixed_labels = data.fixed_labels.array
        scores = structure_scores(fixed_labels, output.warped_labels.array, labels, data.fixed.spacing)
        dice = np.array([s[0] for s in scores.values()], dtype=np.float64)
        row["dice_mean"], row["dice_std"] = _nanmean(dice), float(np.nanstd(dice)) if np.isfinite(dice).any() else math.nan
        row["hd95_mean_mm"] = _nanmean([s[1] for s in scores.values()])
        structures = [{"label": label, "name": names.get(label, f"label {label}") if names else label_name(label),
                       "dice": d, "hd95_mm": h}
                      for label, (d, h) in scores.items()]
    if data.fixed_points is not None:
        row["tre_after_mm"] = mean_distance(data.moving_points, output.map_points(data.fixed_points))
    return row, structures


def _before(data: PairData, labels: Sequence[int]) -> _Before:
    """The pair's reference measures (NCC/MI, Dice, TRE before registration), cached on
    ``data`` so that several methods of one pair compute them once."""
    if data.before is None:
        scale = _IntensityScale(data.moving)
        fixed_n = io.normalize_intensity(data.fixed.array)
        row: Row = {}
        unregistered = io.resample_to(data.moving, data.fixed)
        row["ncc_before"], row["mi_before"] = global_similarity(fixed_n, scale(unregistered.array))
        if data.fixed_labels is not None and data.moving_labels is not None and labels:
            moving_labels = io.resample_to(data.moving_labels, data.fixed, nearest=True).array
            row["dice_before"] = _nanmean(metrics.dice_per_label(data.fixed_labels.array, moving_labels,
                                                                 labels).values())
        if data.fixed_points is not None:
            row["tre_before_mm"] = mean_distance(data.moving_points, data.fixed_points)
        data.before = _Before(scale, fixed_n, row)
    return data.before


def _nanmean(values: Iterable[float]) -> float:
    array = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(array)) if np.any(np.isfinite(array)) else float("nan")


def run_one(data: PairData, method: str, options: EvaluationOptions, labels: Sequence[int],
            runner: MethodRunner | None = None,
            names: Mapping[int, str] | None = None) -> tuple[Row, list[Row], MethodOutput]:
    """Run ``method`` on a loaded pair and measure it: (result row, per-structure rows, output)."""
    runner = runner or METHODS[method]
    with PeakMemory("cpu" if method in CPU_METHODS else options.device) as memory:
        output = runner(data, options)
    row, structures = measure(data, output, labels, names)
    row.update({"status": "ok", "error": "", "seconds": output.seconds, "peak_memory_mb": memory.peak_mb,
                "device": output.device, "threads": output.threads,
                "settings": json.dumps(output.settings, sort_keys=True, default=str)})
    return row, structures, output


def describe_row(row: Mapping[str, Any]) -> str:
    """Short text of a finished result row for progress displays (empty for skipped rows)."""
    if not row:
        return ""
    text = f"{row.get('id', '')} {row.get('method', '')}: {row.get('status', '')}"
    dice = row.get("dice_mean")
    if isinstance(dice, float) and math.isfinite(dice):
        text += f", Dice {dice:.3f}"
    return text


def error_line(exc: BaseException) -> str:
    """One-line description of an exception (VoxregError messages as they are)."""
    text = str(exc) if isinstance(exc, VoxregError) else f"{type(exc).__name__}: {exc}"
    return one_line(text, limit=500)


# --------------------------------------------------------------------------- CSV store


class ResultStore:
    """results.csv and per_structure.csv of an output folder, rewritten atomically (temporary
    name in the same folder, then ``os.replace``) after every row."""

    def __init__(self, outdir: Path) -> None:
        self.results_csv = outdir / "results.csv"
        self.structures_csv = outdir / "per_structure.csv"
        self.rows = _read_rows(self.results_csv)
        self.structures = _read_rows(self.structures_csv)

    def is_done(self, pair_id: str, method: str) -> bool:
        """True when (pair_id, method) already has a row with status ok."""
        return any(r.get("id") == pair_id and r.get("method") == method and r.get("status") == "ok"
                   for r in self.rows)

    def add(self, row: Row, structures: Sequence[Row]) -> None:
        """Replace any earlier rows of (id, method) by these and rewrite both files."""
        key = (row["id"], row["method"])
        self.rows = [r for r in self.rows if (r.get("id"), r.get("method")) != key] + [row]
        self.structures = [r for r in self.structures if (r.get("id"), r.get("method")) != key]
        self.structures += [{"id": row["id"], "method": row["method"], **s} for s in structures]
        _write_rows(self.structures_csv, STRUCTURE_COLUMNS, self.structures)
        _write_rows(self.results_csv, RESULT_COLUMNS, self.rows)


_TEXT_COLUMNS = {"id", "fixed", "moving", "method", "status", "error", "device", "settings", "name"}
_INT_COLUMNS = {"threads", "label"}


def _read_rows(path: Path) -> list[Row]:
    """Rows of an earlier results/per-structure CSV, with numbers as int/float (empty: NaN)."""
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: _typed(k, v) for k, v in row.items() if k is not None} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise VoxregError(f"{path}: cannot read the earlier results to resume ({short_reason(exc)})") from exc


def _typed(column: str, text: str | None) -> Any:
    text = text or ""
    if column in _TEXT_COLUMNS:
        return text
    if column in _INT_COLUMNS:
        return int(text) if text else None
    return float(text) if text else float("nan")


def _write_rows(path: Path, columns: Sequence[str], rows: Sequence[Row]) -> None:
    with io.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
            handle.flush()
            os.fsync(handle.fileno())


def _csv_value(value: Any) -> str:
    """CSV text of a value: floats with 6 significant digits, NaN/None as empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else format(float(value), ".6g")
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- examples


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "pair"


def example_figure(fixed: Image, warped: Image, path: PathLike, title: str = "") -> Path:
    """A small PNG: fixed (top row) and warped (bottom row) mid-slices, display convention
    of :mod:`voxreg.report`."""
    from matplotlib.figure import Figure

    from voxreg.viz.registration_figure import _cut, display_planes, show_slice

    planes = display_planes(fixed.shape, fixed.affine)
    spacing = fixed.spacing
    low, high = np.percentile(fixed.array, [1, 99])
    fig = Figure(figsize=(2.2 * len(planes), 4.6))
    axes = fig.subplots(2, len(planes), squeeze=False)
    for column, plane in enumerate(planes):
        aspect = float(spacing[plane.vertical] / spacing[plane.horizontal])
        for row, (name, image) in enumerate((("fixed", fixed), ("warped", warped))):
            show_slice(axes[row, column], _cut(image.array, plane), plane, aspect, cmap="gray",
                       vmin=low, vmax=high if high > low else low + 1)
            if column == 0:
                axes[row, column].set_ylabel(name)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with io.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvaluationResult:
    """Paths written by :func:`evaluate` and the rows of results.csv after the run."""

    outdir: Path
    results_csv: Path
    per_structure_csv: Path
    rows: list[Row]
    structure_rows: list[Row]
    examples: list[Path] = dataclass_field(default_factory=list)
    report: dict[str, Path] = dataclass_field(default_factory=dict)
    warnings: list[str] = dataclass_field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: int = 0


def resolve_methods(methods: Sequence[str] | str | None, model: PathLike | None) -> list[str]:
    """Method names to run: the given ones (comma string or list), checked, or the defaults
    (:data:`DEFAULT_METHODS`, plus :data:`MODEL_METHODS` when a model is given)."""
    if isinstance(methods, str):
        methods = [m for m in (s.strip() for s in methods.split(",")) if m]
    if not methods:
        methods = list(DEFAULT_METHODS) + (list(MODEL_METHODS) if model is not None else [])
    names = list(dict.fromkeys(m.strip().lower() for m in methods))
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise VoxregError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if model is None and any(m in MODEL_METHODS for m in names):
        raise VoxregError("methods network and network-refine need --model CHECKPOINT")
    if model is not None and not Path(model).is_file():
        raise VoxregError(f"{model}: model checkpoint not found")
    return names


def evaluate(pairs_csv: PathLike, outdir: PathLike, methods: Sequence[str] | str | None = None, *,
             model: PathLike | None = None, refine: int = 50, lam: float | None = None,
             similarity: str = "ncc", device: str | torch.device = "auto", structures: str = "all",
             exclude_labels: Iterable[int] = (0,), ants_threads: int | None = None, examples: int = 2,
             iterations: Sequence[int] | None = None, progress: ProgressCallback | None = None) -> EvaluationResult:
    """Run ``methods`` on every pair of ``pairs_csv`` and write results.csv, per_structure.csv
    and example PNGs into ``outdir`` (see the module docstring). A failing (pair, method) is
    recorded with status ``failed`` and the run goes on; (pair, method) rows already ``ok`` in
    ``outdir`` are skipped. ``progress(done, total, row)`` is called after each (pair, method)."""
    from voxreg.core.runtime import resolve_device

    pairs = read_pairs(pairs_csv)
    names = resolve_methods(methods, model)
    if "ants-syn" in names:
        import_ants()
    _check_structures(structures)
    options = EvaluationOptions(model=Path(model) if model is not None else None, refine=int(refine), lam=lam,
                                similarity=similarity, device=resolve_device(device), ants_threads=ants_threads,
                                iterations=tuple(int(i) for i in iterations) if iterations else None)
    _align_config(options)  # bad --similarity / --lambda / --iterations fail before any work
    outdir = io.ensure_output_dir(outdir)
    store = ResultStore(outdir)
    result = EvaluationResult(outdir, store.results_csv, store.structures_csv, store.rows, store.structures)
    total, done = len(pairs) * len(names), 0
    exclude = tuple(int(v) for v in exclude_labels)
    for index, pair in enumerate(pairs):
        todo = [m for m in names if not store.is_done(pair.id, m)]
        result.skipped += len(names) - len(todo)
        done += len(names) - len(todo)
        if progress is not None and len(todo) < len(names):
            progress(done, total, {})
        if not todo:
            continue
        for row in _evaluate_pair(pair, todo, options, structures, exclude, index < examples, store, result):
            done += 1
            if progress is not None:
                progress(done, total, row)
    result.rows, result.structure_rows = store.rows, store.structures
    _write_report(result)
    return result


def _check_structures(structures: str) -> None:
    structure_table(structures)


def _evaluate_pair(pair: Pair, methods: Sequence[str], options: EvaluationOptions, structures: str,
                   exclude: Sequence[int], example: bool, store: ResultStore,
                   result: EvaluationResult) -> Iterable[Row]:
    """Load one pair and run each method on it, storing every row as soon as it is done."""
    try:
        data = load_pair(pair)
        labels = (select_labels(data.fixed_labels.array, data.moving_labels.array, structures, exclude)
                  if data.fixed_labels is not None else [])
        names = structure_table(structures)
    except Exception as exc:  # a broken pair fails its rows, the others still run
        for method in methods:
            row = _failed_row(pair, method, exc)
            store.add(row, [])
            result.failed += 1
            yield row
        return
    for method in methods:
        try:
            row, per_structure, output = run_one(data, method, options, labels, names=names)
        except Exception as exc:
            row, per_structure, output = _failed_row(pair, method, exc), [], None
            result.failed += 1
        else:
            result.ran += 1
        row.update({"id": pair.id, "fixed": str(pair.fixed), "moving": str(pair.moving), "method": method})
        store.add(row, per_structure)
        if example and output is not None:
            try:
                result.examples.append(_example(output, data, pair, method, store.results_csv.parent, row))
            except Exception as exc:  # the row is stored; a figure problem only costs the figure
                result.warnings.append(f"example {pair.id} {method}: {error_line(exc)}")
        yield row


def _failed_row(pair: Pair, method: str, exc: BaseException) -> Row:
    return {"id": pair.id, "fixed": str(pair.fixed), "moving": str(pair.moving), "method": method,
            "status": "failed", "error": error_line(exc)}


def _example(output: MethodOutput, data: PairData, pair: Pair, method: str, outdir: Path, row: Row) -> Path:
    title = f"{pair.id} {method}"
    if row.get("dice_mean") is not None:
        title += f"  Dice {row['dice_mean']:.3f}"
    title += f"  NCC {row['ncc_before']:.3f} -> {row['ncc_after']:.3f}"
    path = outdir / "examples" / f"{_safe_name(pair.id)}_{_safe_name(method)}.png"
    return example_figure(data.fixed, output.warped, path, title)


def _write_report(result: EvaluationResult) -> None:
    """Call voxreg.evaluation_report.write_report(outdir) when that module is available."""
    try:
        from voxreg.evaluation.report import write_report
    except ImportError:
        return
    try:
        result.report = {k: Path(v) for k, v in (write_report(result.outdir) or {}).items()}
    except Exception as exc:  # the CSVs are complete; a report problem must not lose them
        result.warnings.append(f"report: {error_line(exc)}")
