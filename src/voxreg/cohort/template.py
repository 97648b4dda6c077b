"""Unbiased groupwise template building: ``voxreg template`` without the argument parsing.

Algorithm (the template construction of ANTs' ``antsMultivariateTemplateConstruction``):

0. **Affine average.** Every scan is registered affinely to the reference (the first scan or
   ``initial``, on a grid of ``spacing`` mm when given); the scans, scaled to [0, 1] by robust
   percentiles, are averaged on the reference grid: template ``T_0``.
1. **Iterations** ``k = 1..N``. Every scan is registered to ``T_{k-1}`` (affine + deformable, by
   :func:`voxreg.registration.pipeline.register`: the model is loaded once per process); the
   warped scans are averaged (``W``) and so are their fields (``u``, voxels of the template
   grid); from ``k = 2`` each scan's affine stage is the one it found in iteration ``k - 1``
   (the template moves little by then: on 8 Mindboggle scans the template build took 40 -> 30 s
   for the same label agreement; ``refresh_affines`` reruns it every time, as ANTs does).
   Every field maps template points ``x`` to the scan at ``x + u_i(x)``; when ``T_{k-1}``
   is the true mean shape deformed by ``x -> x + c(x)``, ``mean_i u_i ~ c``, so the shape
   update moves the template back by the inverse of the mean field: ``T_k(x) = W(x + v(x))``
   with ``v`` = :func:`voxreg.core.spatial.invert_displacement` ``(mean u)`` -- the
   ``template <- W o (-mean field)`` step of ANTs, with the exact inverse instead of ``-u``.
   The affine stages are averaged too: the mean of their symmetric (scale/shear) factors,
   about the template's centre of mass, is composed after the mean field before inverting
   (:func:`mean_stretch`; rotation and translation left out, as ANTs' ``useNoRigid``), so the
   template does not keep the first scan's size and shear. Iteration 0 applies it as well.
2. **Final registrations.** Every scan is registered to the final template through
   :func:`voxreg.registration.batch.run_batch` into ``OUT/scans/<id>/`` (the files of
   ``voxreg register``, so ``voxreg warp`` applies them); label maps are carried and voted
   into ``template_labels.nii.gz`` (majority per voxel).

Resume: ``OUT/iter_<k>/template.nii.gz`` (and ``stats.json``) is written all at once after
iteration ``k``; a rerun with the same scans and settings (``template_run.json``) starts after
the last complete iteration, ``--iterations`` may grow, and finished final registrations are
skipped (folders registered to an older template are redone). Final files
(``template.nii.gz``, ``template_labels.nii.gz``, ``convergence.csv``/``.png``,
``montage.png``) are moved into ``OUT`` together, only when everything succeeded.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import io
from voxreg.core import spatial
from voxreg.core.config import check_int, check_number
from voxreg.core.errors import VoxregError
from voxreg.core.grid import level_grid, reduced_affine
from voxreg.core.image import Image
from voxreg.core.runtime import resolve_device
from voxreg.io.staging import staged_outputs
from voxreg.io.tables import read_table, write_table
from voxreg.registration import batch, pipeline
from voxreg.registration.outputs import write_json

__all__ = ["TemplateOptions", "TemplateResult", "TemplateScan", "build_template", "derive_ids", "read_scans"]

FINAL_OUTPUTS = ("template.nii.gz", "template_labels.nii.gz", "convergence.csv", "convergence.png", "montage.png")
CONVERGENCE_COLUMNS = ("iteration", "template_change_rms", "mean_local_ncc", "seconds")
RUN_FILE = "template_run.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CSV_COLUMNS = ("scan", "labels", "id")
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TemplateScan:
    """One input scan: its id (``OUT/scans/<id>/``), file and optional label map."""

    id: str
    scan: Path
    labels: Path | None = None


@dataclass(frozen=True)
class TemplateOptions:
    """Settings of one template build (all but ``iterations``/``figure``/``device`` identify a run)."""

    iterations: int = 4
    initial: str | None = None  # a file, 'mni152' or None (the first scan)
    spacing: float | None = None
    engine: str = "auto"
    model: str | None = None
    similarity: str = "ncc"
    lam: float | None = None
    refine: int | None = None
    device: str = "auto"
    figure: bool = True
    # iterations 2..N reuse each scan's affine stage from the iteration before (the template
    # moves little after iteration 1); True reruns it at every iteration, as ANTs does
    refresh_affines: bool = False

    def check(self) -> None:
        """One-line VoxregError for a bad option value."""
        try:
            check_int("--iterations", self.iterations, 0)
            if self.spacing is not None:
                check_number("--spacing", self.spacing, low=0.0, low_inclusive=False)
        except ValueError as exc:
            raise VoxregError(str(exc)) from None
        if self.engine not in pipeline.ENGINES:
            raise VoxregError(f"--engine must be one of {', '.join(pipeline.ENGINES)}, got {self.engine!r}")

    def run_key(self, scans: Sequence[TemplateScan]) -> dict[str, Any]:
        """What must match for a rerun to continue an earlier one (template_run.json)."""
        ignored = ("iterations", "figure", "device", "refresh_affines")
        settings = {k: v for k, v in asdict(self).items() if k not in ignored}
        entries = [[s.id, str(s.scan.resolve()), str(s.labels.resolve()) if s.labels else None] for s in scans]
        return {"scans": entries, "settings": settings}


@dataclass
class TemplateResult:
    """What a build wrote: the template, the voted labels, the convergence rows, timings."""

    outdir: Path
    template: Path
    labels: Path | None
    convergence: list[dict[str, Any]]
    seconds: float
    resumed_after: int | None  # the last iteration found complete on disk, None for a fresh run
    count: int = 0  # scans

    def line(self) -> str:
        """One-line summary of the build."""
        last = self.convergence[-1]
        resumed = "" if self.resumed_after is None else f" (resumed after iteration {self.resumed_after})"
        change = last["template_change_rms"]
        change_text = "" if change is None else f", last change {change:.4f}"
        return (
            f"template of {self.count} scans, {len(self.convergence) - 1} iterations{resumed} in "
            f"{self.seconds:.1f} s: mean local NCC {last['mean_local_ncc']:.3f}{change_text}; {self.template}"
        )


# --------------------------------------------------------------------------- scan list


def read_scans(items: Sequence[str | Path]) -> list[TemplateScan]:
    """Scans of ``items``: image files, glob patterns, or CSVs of ``scan[,labels][,id]`` rows
    (a header naming those columns, or none; paths relative to the CSV). Ids not given are
    derived from the paths (:func:`derive_ids`). VoxregError for a missing file, an empty
    glob, a bad or repeated id, or a scan given twice."""
    rows: list[tuple[Path, Path | None, str | None]] = []
    for item in items:
        text = str(item)
        if text.lower().endswith(".csv"):
            rows += _csv_scans(Path(text))
        elif any(char in text for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not found:
                raise VoxregError(f"{text}: no file matches this pattern")
            rows += [(p, None, None) for p in found]
        else:
            rows.append((Path(text), None, None))
    if len(rows) < 2:
        raise VoxregError(f"a template needs at least 2 scans, got {len(rows)}")
    for path in [p for row in rows for p in row[:2] if p is not None]:
        if not path.exists():
            raise VoxregError(f"{path}: file not found")
    return _with_ids(rows)


def _csv_scans(path: Path) -> list[tuple[Path, Path | None, str | None]]:
    """``(scan, labels, id)`` rows of a CSV scan list with the header ``scan[,labels][,id]``
    (paths relative to the CSV; empty and ``#`` rows skipped)."""
    records = read_table(path, "scan list")
    columns = [str(c).strip().lower() for c in (records[0] if records else {}) if c is not None]
    if "scan" not in columns:
        raise VoxregError(f"{path}: scan list needs a header row scan[,labels][,id] and at least one row")
    unknown = [c for c in columns if c not in _CSV_COLUMNS]
    if unknown:
        raise VoxregError(f"{path}: unknown column {unknown[0]} (expected scan[,labels][,id])")
    rows = []
    for record in records:
        values = {str(k).strip().lower(): (v or "").strip() for k, v in record.items() if k is not None}
        if not values["scan"] or values["scan"].startswith("#"):
            continue
        labels = values.get("labels") or None
        rows.append((path.parent / values["scan"], path.parent / labels if labels else None, values.get("id") or None))
    if not rows:
        raise VoxregError(f"{path}: scan list has no rows")
    return rows


def _stem(part: str) -> str:
    """A path part without image extensions, as a plain folder name (letters, digits, . _ -)."""
    for ext in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".mhd", ".npz"):
        if part.lower().endswith(ext):
            part = part[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-.") or "scan"


def derive_ids(paths: Sequence[Path]) -> list[str]:
    """Unique ids of scan files: the file name without extensions, with as many parent
    folders prefixed as it takes to tell repeated names apart (``sub-01/T1.nii.gz``,
    ``sub-02/T1.nii.gz`` -> ``sub-01_T1``, ``sub-02_T1``)."""
    parts = [[_stem(p) for p in path.resolve().parts[1:]] for path in paths]
    ids = [p[-1] for p in parts]
    for depth in range(2, max((len(p) for p in parts), default=1) + 1):
        repeated = {i for i in ids if ids.count(i) > 1}
        if not repeated:
            break
        ids = ["_".join(p[-depth:]) if i in repeated else i for p, i in zip(parts, ids)]
    return ids


def _with_ids(rows: Sequence[tuple[Path, Path | None, str | None]]) -> list[TemplateScan]:
    """TemplateScans of rows, ids given or derived; VoxregError for bad or repeated ones."""
    resolved = [row[0].resolve() for row in rows]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise VoxregError(f"{rows[index][0]}: scan is given twice")
    derived = iter(derive_ids([row[0] for row in rows if row[2] is None]))
    ids = [row[2] if row[2] is not None else next(derived) for row in rows]
    for index, scan_id in enumerate(ids):
        if not _ID.match(scan_id):
            raise VoxregError(f"{rows[index][0]}: id {scan_id!r} is not a plain folder name (letters, digits, . _ -)")
        if scan_id in ids[:index]:
            raise VoxregError(f"{rows[index][0]}: id {scan_id} is repeated (ids name the folders OUT/scans/<id>)")
    return [TemplateScan(i, row[0], row[1]) for i, row in zip(ids, rows)]


# --------------------------------------------------------------------------- loading


@dataclass
class _Loaded:
    """A scan in memory with its robust intensity range (to scale it to [0, 1])."""

    entry: TemplateScan
    image: Image
    low: float
    high: float

    def unit(self, array: np.ndarray) -> np.ndarray:
        """``array`` (this scan's intensities) scaled to [0, 1] by the scan's robust range."""
        return np.clip((array - self.low) / max(self.high - self.low, 1e-12), 0.0, 1.0).astype(np.float32)


def _load(entry: TemplateScan) -> _Loaded:
    """Read one scan (and check its label map); VoxregError naming the file on bad input."""
    image = pipeline.as_image(entry.scan)
    if entry.labels is not None:
        labels = pipeline.as_image(entry.labels, label=True)
        if labels.ndim != image.ndim:
            raise VoxregError(f"{entry.labels}: label map is {labels.ndim}D but its scan {entry.scan} is {image.ndim}D")
    values = image.array[image.array != 0] if np.any(image.array == 0) else image.array.reshape(-1)
    low, high = io.robust_range(values.astype(np.float32, copy=False), 0.5, 99.5)
    return _Loaded(entry, image, float(low), float(high))


def _check_dims(loaded: Sequence[_Loaded], reference: Image) -> None:
    """Every scan must have the reference's dimensionality."""
    for scan in loaded:
        if scan.image.ndim != reference.ndim:
            raise VoxregError(
                f"{scan.entry.scan} is {scan.image.ndim}D but {reference.path or 'the reference'} is "
                f"{reference.ndim}D: all scans must have the same dimensionality"
            )


def reference_grid(first: Image, initial: str | None, spacing: float | None) -> Image:
    """The template grid: ``initial`` ('mni152', a file) or the first scan, resampled to
    ``spacing`` mm (isotropic, same extent) when given."""
    if initial is None:
        reference = first
    elif initial.strip().lower() == "mni152":
        from voxreg.io.templates import mni152_template

        reference = mni152_template(2 if spacing is not None and spacing >= 2 else 1)
    else:
        reference = pipeline.as_image(Path(initial))
    if spacing is None:
        return reference
    ndim = reference.ndim
    matrix, shape = level_grid(reduced_affine(reference.affine, ndim), reference.shape, float(spacing))
    affine = reference.affine.copy()
    keep = [*range(ndim), 3]
    affine[np.ix_(keep, keep)] = matrix
    return io.resample_to(reference, Image(np.zeros(shape, np.float32), affine))


# --------------------------------------------------------------------------- the steps


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(1, 1, *S)`` float32 tensor of ``array``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _local_ncc(template: np.ndarray, warped: np.ndarray, device: torch.device) -> float:
    """Local NCC (squared, window 9; as metrics.json's ``local_ncc``) of a warped scan to the template."""
    from voxreg.metrics.similarity import similarities

    return similarities(_tensor(template, device), _tensor(warped, device), max_voxels=1 << 14)["local_ncc"]


def affine_average(
    scans: Sequence[_Loaded], reference: Image, device: torch.device, step: Callable[[str], None]
) -> tuple[Image, dict[str, Any]]:
    """Iteration 0: every scan registered affinely to ``reference``, scaled to [0, 1],
    averaged on its grid and moved back by the mean affine stretch (:func:`shape_update`).
    Returns the template and its stats."""
    start = time.perf_counter()
    warped, matrices = [], []
    for scan in scans:
        result = pipeline.register(reference, scan.image, affine_only=True, metrics=False, device=device)
        warped.append(scan.unit(result.warped.array))
        matrices.append(result.world_matrix)
        step(scan.entry.id)
    mean = Image(np.mean(warped, axis=0).astype(np.float32), reference.affine.copy())
    zero = torch.zeros(1, reference.ndim, *reference.shape, device=device)
    template = shape_update(mean, zero, mean_stretch(matrices, reference.ndim))
    ncc = float(np.mean([_local_ncc(mean.array, w, device) for w in warped]))
    stats = {"iteration": 0, "template_change_rms": None, "mean_local_ncc": ncc}
    return template, {**stats, "seconds": time.perf_counter() - start}


def mean_stretch(matrices: Sequence[np.ndarray | None], ndim: int) -> np.ndarray:
    """Mean of the symmetric factors ``P_i`` of the polar decompositions ``R_i P_i`` of the
    affine stages' linear parts (fixed -> moving world, ``(ndim, ndim)``): the scans' mean
    scaling and shear relative to the template, rotations and translations left out (ANTs'
    ``useNoRigid``; rotations of opposite sign cannot cancel the scaling out)."""
    stretches = []
    for matrix in matrices:
        linear = np.eye(ndim) if matrix is None else reduced_affine(matrix, ndim)[:ndim, :ndim]
        _, singular, vt = np.linalg.svd(linear)
        stretches.append(vt.T @ np.diag(singular) @ vt)
    return np.mean(stretches, axis=0)


def mean_map_field(template: Image, stretch: np.ndarray, mean_field: torch.Tensor) -> torch.Tensor:
    """Displacement (template voxels) of the mean map of template points into the scans:
    ``x -> C(x + mean_field(x))``, ``C`` the world ``stretch`` about the template's centre of mass."""
    ndim = template.ndim
    voxel_to_world = reduced_affine(template.affine, ndim)
    weights = np.clip(template.array, 0, None).astype(np.float64)
    index = np.indices(template.shape).reshape(ndim, -1) @ weights.reshape(-1) / max(weights.sum(), 1e-12)
    centre = voxel_to_world @ np.append(index, 1.0)
    world = np.eye(ndim + 1)
    world[:ndim, :ndim] = stretch
    world[:ndim, ndim] = centre[:ndim] - stretch @ centre[:ndim]
    matrix = np.linalg.inv(voxel_to_world) @ world @ voxel_to_world
    if np.allclose(matrix, np.eye(ndim + 1), atol=1e-6):
        return mean_field
    affine_field = spatial.matrix_to_field(torch.as_tensor(matrix, dtype=mean_field.dtype), template.shape)
    return spatial.compose(affine_field.to(mean_field.device), mean_field)


def shape_update(mean_warped: Image, mean_field: torch.Tensor, stretch: np.ndarray) -> Image:
    """The average of the warped scans moved back by the mean deformation: ``W(x + v(x))``,
    ``v`` the inverse (:func:`voxreg.core.spatial.invert_displacement`) of the mean map
    :func:`mean_map_field` (mean field, then mean affine stretch)."""
    total = mean_map_field(mean_warped, stretch, mean_field)
    if not bool(total.any()):
        return mean_warped
    moved = spatial.warp(_tensor(mean_warped.array, total.device), spatial.invert_displacement(total))
    return Image(moved[0, 0].cpu().numpy(), mean_warped.affine.copy())


def template_iteration(
    template: Image,
    scans: Sequence[_Loaded],
    options: TemplateOptions,
    device: torch.device,
    step: Callable[[str], None],
    affines: Sequence[np.ndarray] | None = None,
) -> tuple[Image, dict[str, Any]]:
    """One iteration: register every scan to ``template`` (its affine stage given by
    ``affines``, one world matrix per scan, else run), average the warped scans, the fields
    and the affine stages, apply the shape update. Returns the new template and the
    iteration's stats: template change (RMS), mean local NCC of the warped scans to
    ``template``, and the affine stages (``affines``, 4x4 lists)."""
    total_warped = np.zeros(template.shape, np.float32)
    total_field = torch.zeros(1, template.ndim, *template.shape, device=device)
    scores, matrices = [], []
    for index, scan in enumerate(scans):
        result = pipeline.register(
            template,
            scan.image,
            world_matrix=None if affines is None else affines[index],
            model=options.model,
            engine=options.engine,
            similarity=options.similarity,
            lam=options.lam,
            refine=options.refine,
            device=device,
            metrics=False,
        )
        warped = scan.unit(result.warped.array)
        scores.append(_local_ncc(template.array, warped, device))
        total_warped += warped
        total_field += result.field.to(device)
        matrices.append(result.world_matrix)
        step(scan.entry.id)
    mean = Image(total_warped / len(scans), template.affine.copy())
    updated = shape_update(mean, total_field / len(scans), mean_stretch(matrices, template.ndim))
    change = float(np.sqrt(np.mean((updated.array - template.array) ** 2)))
    stats = {"template_change_rms": change, "mean_local_ncc": float(np.mean(scores))}
    return updated, {**stats, "affines": [np.asarray(m).tolist() for m in matrices]}


def _previous_affines(outdir: Path, k: int, options: TemplateOptions, count: int) -> list[np.ndarray] | None:
    """The affine stages iteration ``k`` reuses: iteration ``k - 1``'s (from its stats.json)
    when ``k >= 2`` and ``options.refresh_affines`` is off; None (run them) otherwise."""
    if k < 2 or options.refresh_affines:
        return None
    stored = _read_stats(outdir, k - 1).get("affines")
    if not isinstance(stored, list) or len(stored) != count or any(m is None for m in stored):
        return None
    return [np.asarray(m, dtype=np.float64) for m in stored]


def majority_vote(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel the label most of ``maps`` (integer arrays on one grid) agree on; ties go
    to the smaller label."""
    stack = torch.from_numpy(np.stack([np.asarray(m, dtype=np.int64) for m in maps]))
    best_label = torch.zeros(stack.shape[1:], dtype=torch.int64)
    best_count = torch.full(stack.shape[1:], -1, dtype=torch.int64)
    for label in torch.unique(stack).tolist():
        count = (stack == label).sum(dim=0)
        better = count > best_count
        best_label[better] = label
        best_count[better] = count[better]
    return best_label.numpy().astype(np.result_type(*[np.asarray(m).dtype for m in maps]))


# --------------------------------------------------------------------------- files and resume


def _iteration_dir(outdir: Path, k: int) -> Path:
    return outdir / f"iter_{k}"


def last_complete(outdir: Path, iterations: int) -> int | None:
    """The highest ``k <= iterations`` with ``OUT/iter_<k>/template.nii.gz`` when every iteration
    before it is complete too (``stats.json`` is moved in first), or None."""
    done = None
    for k in range(iterations + 1):
        folder = _iteration_dir(outdir, k)
        if not ((folder / "template.nii.gz").is_file() and (folder / "stats.json").is_file()):
            break
        done = k
    return done


def _save_iteration(outdir: Path, k: int, template: Image, stats: dict[str, Any]) -> None:
    """Write ``OUT/iter_<k>/`` (template.nii.gz, stats.json) all at once."""
    with staged_outputs(_iteration_dir(outdir, k), outputs=("template.nii.gz", "stats.json"), lock=False) as stage:
        write_json(stage / "stats.json", stats)
        io.save_image(template, stage / "template.nii.gz")


def _read_stats(outdir: Path, k: int) -> dict[str, Any]:
    return json.loads((_iteration_dir(outdir, k) / "stats.json").read_text(encoding="utf-8"))


def _check_run(outdir: Path, key: dict[str, Any]) -> None:
    """Refuse an output folder holding another build; record this one's key."""
    path = outdir / RUN_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous != json.loads(json.dumps(key)):
            raise VoxregError(
                f"{outdir}: holds a template of other scans or settings ({RUN_FILE}); "
                "choose another output folder, or delete it to start again"
            )
    else:
        write_json(path, key)


def _drop_stale(folder: Path, template: Path) -> None:
    """Remove ``OUT/scans/<id>/`` when it holds a registration to another template."""
    try:
        fixed = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("fixed")
    except (OSError, ValueError, AttributeError):
        return
    if fixed != str(template):
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- the build


def build_template(
    items: Sequence[str | Path] | Sequence[TemplateScan],
    outdir: str | Path,
    options: TemplateOptions | None = None,
    progress: ProgressCallback | None = None,
) -> TemplateResult:
    """Build a template of ``items`` (see :func:`read_scans`) into ``outdir`` (module docstring).

    Every input is read and checked before anything is written. ``progress(done, total,
    info)`` counts registrations. Raises VoxregError for bad input and when a final
    registration fails (the iterations and finished registrations stay, for a rerun)."""
    options = options or TemplateOptions()
    options.check()
    start = time.perf_counter()
    entries = list(items) if items and isinstance(items[0], TemplateScan) else read_scans(items)  # type: ignore[arg-type]
    scans = [_load(entry) for entry in entries]  # type: ignore[arg-type]
    reference = reference_grid(scans[0].image, options.initial, options.spacing)
    _check_dims(scans, reference)
    device = resolve_device(options.device)
    outdir = Path(outdir)
    total = len(scans) * (options.iterations + 2)
    counter = {"done": 0}

    def step(info: str) -> None:
        counter["done"] += 1
        if progress is not None:
            progress(counter["done"], total, info)

    inputs = [p for s in entries for p in (s.scan, s.labels)]  # type: ignore[union-attr]
    with staged_outputs(outdir, inputs=inputs, outputs=FINAL_OUTPUTS, remove_stale=True) as stage:
        _check_run(outdir, options.run_key(entries))  # type: ignore[arg-type]
        done = last_complete(outdir, options.iterations)
        counter["done"] = 0 if done is None else len(scans) * (done + 1)
        template = _iterate(outdir, scans, reference, options, device, step, done)
        template_path = _iteration_dir(outdir, options.iterations) / "template.nii.gz"
        folders = _final_registrations(outdir, entries, template_path, options, step)  # type: ignore[arg-type]
        rows = [_read_stats(outdir, k) for k in range(options.iterations + 1)]
        labels = _write_final(stage, outdir, template, folders, rows)
    return TemplateResult(
        outdir,
        outdir / "template.nii.gz",
        None if labels is None else outdir / labels,
        rows,
        time.perf_counter() - start,
        done,
        len(scans),
    )


def _iterate(
    outdir: Path,
    scans: Sequence[_Loaded],
    reference: Image,
    options: TemplateOptions,
    device: torch.device,
    step: Callable[[str], None],
    done: int | None,
) -> Image:
    """Run the iterations after ``done`` (None: from the affine average); return the last template."""
    if done is None:
        template, stats = affine_average(scans, reference, device, step)
        _save_iteration(outdir, 0, template, stats)
        done = 0
    template = io.load_image(_iteration_dir(outdir, done) / "template.nii.gz")
    for k in range(done + 1, options.iterations + 1):
        start = time.perf_counter()
        affines = _previous_affines(outdir, k, options, len(scans))
        template, stats = template_iteration(template, scans, options, device, step, affines)
        _save_iteration(outdir, k, template, {"iteration": k, **stats, "seconds": time.perf_counter() - start})
        template = io.load_image(_iteration_dir(outdir, k) / "template.nii.gz")
    return template


def _final_registrations(
    outdir: Path,
    entries: Sequence[TemplateScan],
    template_path: Path,
    options: TemplateOptions,
    step: Callable[[str], None],
) -> list[Path]:
    """Register every scan to the final template into ``OUT/scans/<id>/`` (register-batch's
    machinery: resumable per scan; the affine stages of the last iteration reused as the
    iterations do); VoxregError when one fails."""
    scans_dir = outdir / "scans"
    for entry in entries:
        _drop_stale(scans_dir / entry.id, template_path)
    affines = _previous_affines(outdir, options.iterations + 1, options, len(entries))
    pairs = [
        batch.BatchPair(e.id, template_path, e.scan, None, e.labels, None if affines is None else affines[i])
        for i, e in enumerate(entries)
    ]
    summary = batch.run_batch(
        pairs,
        scans_dir,
        model=options.model,
        engine=options.engine,
        device=options.device,
        figure=options.figure,
        progress=lambda done, total: step(f"final {done}/{total}"),
        similarity=options.similarity,
        lam=options.lam,
        refine=options.refine,
    )
    failed = [row for row in summary.rows if row["status"] == "failed"]
    if failed:
        raise VoxregError(
            f"{len(failed)} of {len(pairs)} scans failed to register to the template (first: {failed[0]['id']}: "
            f"{failed[0]['error']}); see {summary.table}, then rerun to resume"
        )
    return [scans_dir / e.id for e in entries]


def _warped_labels(folder: Path) -> Path | None:
    """The one ``warped_<labels>.nii.gz`` of a registration folder, or None."""
    found = sorted(p for p in folder.glob("warped_*.nii.gz"))
    return found[0] if found else None


def _write_final(
    stage: Path,
    outdir: Path,
    template: Image,
    folders: Sequence[Path],
    rows: Sequence[dict[str, Any]],
) -> str | None:
    """Write template, voted labels, convergence table and figures into ``stage``; returns
    the labels' file name (None without label maps)."""
    from voxreg.viz.template import convergence_png, montage_png

    io.save_image(Image(template.array, template.affine), stage / "template.nii.gz")
    write_table(
        stage / "convergence.csv", CONVERGENCE_COLUMNS, [{c: r.get(c) for c in CONVERGENCE_COLUMNS} for r in rows]
    )
    label_files = [f for f in (_warped_labels(folder) for folder in folders) if f is not None]
    name = None
    if label_files:
        maps = [io.load_image(f, label=True) for f in label_files]
        name = "template_labels.nii.gz"
        io.save_image(Image(majority_vote([m.array for m in maps]), template.affine.copy()), stage / name)
    convergence_png(rows, stage / "convergence.png")
    templates = [
        (f"iteration {k}", io.load_image(_iteration_dir(outdir, k) / "template.nii.gz")) for k in range(len(rows))
    ]
    warped = [(folder.name, io.load_image(folder / "warped.nii.gz")) for folder in folders[:4]]
    montage_png(templates, warped, stage / "montage.png")
    return name
