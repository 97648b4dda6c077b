"""What one registration returns and what is made of it afterwards, kept apart from the
pipeline: :class:`RegistrationResult` (transforms and warped images), :func:`measure_registration`
(similarity before/after, Jacobian statistics, Dice: only when asked), :func:`save_outputs`
(warped image and labels, fields and their inverses in voxreg and ITK/ANTs formats,
affine.txt, metrics.json, figure.png; all or nothing through a staging folder, metrics.json
strict JSON) and :func:`apply_inverse_field` (a saved registration applied backwards: a
fixed-space image onto the moving scan's grid)."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.grid import check_affine, voxel_matrix
from voxreg.core.image import Image
from voxreg.core.runtime import release_memory, release_memory_above, resolve_device, torch_threads
from voxreg.io.staging import REGISTER_OUTPUTS, staged_outputs

#: a field on more voxels than this is inverted at half resolution only (the full-resolution
#: fixed-point steps held ~26 float32 volumes): fields of such grids come from optimisation
#: levels of at most 32 M voxels (AlignConfig.max_level_voxels) or from a network's coarser
#: grid, so they are smooth at that scale (a 1 mm brain's network field: 0.074 / 0.21 voxel
#: mean / p99 round trip instead of 0.017 / 0.068)
HALF_RES_INVERSE_ABOVE = 32_000_000
#: the round-trip residual of the inverse is measured on at most this many foreground voxels
#: (every k-th of them; a 1 mm brain's 1.4 M are all measured)
RESIDUAL_VOXELS = 1 << 22
#: Newton steps per node on ``y + v(y) + u(y + v(y)) = y`` at the nodes the mapped voxels reach
#: (:func:`voxreg.core.spatial.newton_inverse`), from a fixed-point inverse (``NEWTON_STEPS``)
#: or from a network's own, a closer start (``NETWORK_NEWTON_STEPS``), then least-squares
#: sweeps fitting the inverse to the forward map at the voxels
#: (:func:`voxreg.core.spatial.fit_inverse`). On the 1 mm pair 2->1 (eighth session; before: a
#: fixed-point step or the network's own inverse, then 4 sweeps), mean / p99 in voxels,
#: inverse after forward | forward after inverse, at the voxels: default engine 0.071 / 0.386 |
#: 0.192 / 1.124 -> 0.098 / 0.461 | 0.079 / 0.446; network alone 0.042 / 0.271 | 0.101 / 0.653
#: -> 0.055 / 0.341 | 0.057 / 0.407 (2 steps: 0.051 / 0.305 the second way, for ~0.4 s more);
#: instance optimisation 0.092 / 0.658 | 0.153 / 0.857 -> 0.117 / 0.747 | 0.066 / 0.392
#: (docs/transforms.md)
NEWTON_STEPS = 2
NETWORK_NEWTON_STEPS = 1
#: a network cascade's (``register(passes=2)``) composed field is sharper: on pair 2 -> 1 one
#: Newton step left 0.074 / 0.548 | 0.081 / 0.664 voxels (mean / p99 of both round trips),
#: two 0.073 / 0.499 | 0.069 / 0.497 for ~0.35 s more (more fixed-point steps on the model
#: grid made it worse: 4 steps 0.095 / 1.003 the second way)
CASCADE_NEWTON_STEPS = 2
FIT_SWEEPS = 1

#: above this many voxels the outputs are written one at a time, with the inverse and the metrics
#: in between, not side by side: each file's full-size copies (a 0.7 mm 512x512x300 field: 0.9 GB
#: per copy) would otherwise coexist (measured there: 10.9 GB peak side by side, 8 GB wanted)
SERIAL_OUTPUTS_ABOVE = 32_000_000

ITK_FIELD_SKIPPED = "not written: ITK 2D fields need an image plane parallel to x-y"
ITK_FIELD_NOT_ASKED = "not written (--no-itk): field.nii.gz holds the same transform in voxreg's convention"
INVERSE_NOT_ASKED = (
    "not computed (--no-inverse): voxreg warp --inverse and voxreg transform-points compute it from field.nii.gz"
)


@dataclass(frozen=True)
class OutputFiles:
    """Which optional fields a registration writes besides ``field.nii.gz`` (all by default; the
    figure has its own ``figure`` flag): the inverse fields (``field_inverse.nii.gz``,
    ``field_itk_inverse.nii.gz``; not computed at all when off) and the ITK/ANTs copies
    (``field_itk*.nii.gz``)."""

    inverse: bool = True
    itk: bool = True


class _InTurn(Executor):
    """An executor that runs each job at once in the calling thread (its future is done), then
    hands the memory the job freed back to the OS (the allocator keeps freed blocks otherwise,
    and each job's full-size copies would add up)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # re-raised by future.result(), after every write ran (Ctrl-C stops at once)
            future.set_exception(exc)
        release_memory()
        return future


def side_by_side(voxels: int) -> bool:
    """Whether the outputs of a grid of ``voxels`` are made side by side (on threads), not in turn:
    up to :data:`SERIAL_OUTPUTS_ABOVE` voxels."""
    return voxels <= SERIAL_OUTPUTS_ABOVE


def output_executor(voxels: int, jobs: int) -> Executor:
    """Threads for ``jobs`` output writes of a grid of ``voxels`` (one per core), or, when not
    :func:`side_by_side`, the calling thread in turn (bounded peak memory)."""
    if not side_by_side(voxels):
        return _InTurn()
    return ThreadPoolExecutor(max_workers=max(1, min(jobs + 3, os.cpu_count() or 1)))


@dataclass
class RegistrationResult:
    """Everything one registration produced; ``save()`` writes the standard outputs.

    ``moving`` is the moving scan on the fixed grid after the affine stage (before the
    field); ``field`` is ``(1, ndim, *fixed.shape)`` in fixed voxels; ``world_matrix`` maps
    fixed world points to moving world points (RAS mm) or is None."""

    fixed: Image
    moving_source: Image | Callable[[], Image]
    warped: Image
    field: torch.Tensor
    warped_labels: dict[str, Image] = dataclass_field(default_factory=dict)
    world_matrix: np.ndarray | None = None
    metrics: dict[str, Any] = dataclass_field(default_factory=dict)
    # the engine's own inverse of ``field`` (same layout), or a function making it on first
    # use (a network alone: its negated velocity); None: inverted from the field when saved
    inverse_source: torch.Tensor | Callable[[], torch.Tensor] | None = None
    # measures still to compute into ``metrics`` (``register(..., defer_metrics=True)``)
    pending_metrics: Callable[[], dict[str, Any]] | None = None
    # guards the first use of ``moving`` (the metrics and the figure threads ask at once)
    _moving_lock: threading.Lock = dataclass_field(default_factory=threading.Lock, repr=False, compare=False)

    def finish_metrics(self) -> dict[str, Any]:
        """Compute the deferred measures into ``metrics`` (once); returns ``metrics``."""
        if self.pending_metrics is not None:
            measure, self.pending_metrics = self.pending_metrics, None
            self.metrics.update(measure())
        return self.metrics

    @property
    def inverse(self) -> torch.Tensor | None:
        """The engine's own inverse of ``field`` on CPU (made on first use), or None."""
        if callable(self.inverse_source):
            self.inverse_source = self.inverse_source().detach().cpu()
        return self.inverse_source

    @property
    def moving(self) -> Image:
        """The moving scan on the fixed grid after the affine stage (made on first use when
        the registration did not need it, e.g. a network alone; by one thread, the others
        that ask meanwhile wait for it)."""
        with self._moving_lock:
            if callable(self.moving_source):
                self.moving_source = self.moving_source()
            return self.moving_source

    def save(self, outdir: str | Path, figure: bool = True, files: OutputFiles | None = None) -> dict[str, Path]:
        """Write the standard outputs into ``outdir`` (see :func:`save_outputs`)."""
        return save_outputs(self, outdir, figure, files=files)


# --------------------------------------------------------------------------- metrics


def _to_tensor(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``(1, 1, *S)`` float32 tensor of ``array`` on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _normalised(image: Image, device: torch.device | str) -> torch.Tensor:
    """Image scaled to [0, 1] by robust percentiles, as a tensor."""
    return _to_tensor(io.normalize_intensity(image.array), device)


def _normalised_alike(images: Sequence[Image], device: torch.device | str) -> list[torch.Tensor]:
    """The images scaled to [0, 1] by the first one's robust percentiles (one intensity
    scale for the moving scan before and after the field), as tensors."""
    low, high = io.robust_range(np.asarray(images[0].array, dtype=np.float32), 0.5, 99.5)
    if not high > low:  # a constant scan: zeros, as io.normalize_intensity gives it
        return [_to_tensor(np.zeros(image.shape, np.float32), device) for image in images]
    return [_to_tensor(io.normalize_intensity(image.array, window=(low, high)), device) for image in images]


def similarity_metrics(
    fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor, raw: torch.Tensor | None = None
) -> dict[str, float]:
    """Similarities of normalised fixed/moving tensors before and after the registration
    (``warped``: the moving scan as the registration's output holds it, one interpolation
    from the raw scan), and of the ``raw`` moving scan before any alignment (keys
    ``*_raw``) when given."""
    with torch.no_grad():
        return metrics.similarity_report(fixed, moving, warped, raw=raw)


def dice_metrics(
    fixed_labels: Image,
    fixed: Image,
    moving_labels: Mapping[str, Image],
    warped_labels: Mapping[str, Image],
    world_matrix: np.ndarray | None,
    device: torch.device | str,
) -> dict[str, Any]:
    """Dice of the first moving label map against the fixed one: raw (before any
    alignment), after the affine stage when one ran, and after the full registration."""
    if fixed_labels.shape != fixed.shape or not np.allclose(fixed_labels.affine, fixed.affine, atol=1e-3):
        fixed_labels = io.resample_to(fixed_labels, fixed, device=device)
    name, moving = next(iter(moving_labels.items()))
    labels = sorted(set(np.unique(fixed_labels.array)) & set(np.unique(moving.array)) - {0})
    stages = {"before": io.resample_to(moving, fixed, device=device, copy=False), "after": warped_labels[name]}
    if world_matrix is not None:
        stages["affine"] = io.resample_to(moving, fixed, world_matrix, device=device)
    many = metrics.dice_per_label_many(fixed_labels.array, [img.array for img in stages.values()], labels)
    scores = dict(zip(stages, many))
    values: dict[str, Any] = {"dice_labels": name}
    for stage, per_label in scores.items():
        values[f"dice_mean_{stage}"] = float(np.nanmean(list(per_label.values()))) if per_label else float("nan")
    values["dice_per_label"] = {int(k): {stage: scores[stage][k] for stage in scores} for k in labels}
    return values


def measure_registration(
    result: RegistrationResult,
    source: Image | None = None,
    fixed_labels: Image | None = None,
    moving_labels: Mapping[str, Image] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluation measures of ``result`` (a new dict; ``result`` is not changed).

    Jacobian statistics of the field, similarity before the field (the moving scan after the
    affine stage) and after it (``result.warped``), both on the moving scan's intensity scale
    (robust percentiles mapped to [0, 1]), the similarity of the raw ``source`` moving scan (pass it when an affine
    stage ran), and Dice when ``fixed_labels`` and the original ``moving_labels`` are given."""
    fixed_t = _normalised(result.fixed, device)
    values: dict[str, Any] = dict(metrics.jacobian_stats(result.field))
    raw_t = (
        None if source is None else _normalised(io.resample_to(source, result.fixed, device=device, copy=False), device)
    )
    # "after" is warped.nii.gz itself (the raw scan resampled once through the affine map and
    # the field), not the affine-resampled scan warped again, whose second interpolation
    # blurs it and flattered the similarity (pair 2->1, network: local NCC 0.908 vs 0.905)
    moving_t, warped_t = _normalised_alike([result.moving, result.warped], device)
    values["similarity"] = similarity_metrics(fixed_t, moving_t, warped_t, raw_t)
    if fixed_labels is not None and moving_labels:
        values.update(
            dice_metrics(fixed_labels, result.fixed, moving_labels, result.warped_labels, result.world_matrix, device)
        )
    return values


# --------------------------------------------------------------------------- files


def save_outputs(
    result: RegistrationResult,
    outdir: str | Path,
    figure: bool = True,
    inputs: Sequence[str | Path] = (),
    files: OutputFiles | None = None,
) -> dict[str, Path]:
    """Write warped image, labels, fields (voxreg + ITK), affine.txt, metrics.json and
    figure.png into ``outdir``, all or nothing (:func:`voxreg.io.staging.staged_outputs`:
    staged, locked, inputs never overwritten, stale outputs of an earlier run removed).
    ``files`` leaves optional fields out (:class:`OutputFiles`).
    ``result.metrics`` is left unchanged (notes about skipped files go to metrics.json only)."""
    sources = [*inputs, result.fixed.path, result.moving.path, *(lab.path for lab in result.warped_labels.values())]
    with staged_outputs(outdir, inputs=sources, outputs=REGISTER_OUTPUTS, remove_stale=True) as stage:
        names = write_outputs(result, stage, figure, files)
    return {key: Path(outdir) / name for key, name in names.items()}


def write_outputs(
    result: RegistrationResult, folder: str | Path, figure: bool = True, files: OutputFiles | None = None
) -> dict[str, str]:
    """Write the standard outputs into ``folder`` (a staging folder); returns their file
    names by key. metrics.json names this run's files (``outputs``) and is strict JSON.
    ``files`` (default: all) leaves out the inverse (not computed then) or the ITK copies;
    metrics.json says which were not asked for.

    The files are compressed on up to one thread per core while this thread inverts the field,
    one more computes the deferred metrics (:meth:`RegistrationResult.finish_metrics`) and one
    more draws the figure, whose title (the metrics) comes last, each job on one torch thread
    (:func:`~voxreg.core.runtime.torch_threads`: a 1 mm pair's network command, 3 alternating
    runs, 8.6-9.5 -> 7.9-8.5 s wall); on a grid of more than
    :data:`SERIAL_OUTPUTS_ABOVE` voxels everything runs in turn on this thread
    (:func:`output_executor`), the figure after the metrics. Every write finishes before the
    first error, if any, is raised; a failure anywhere stops the figure's wait."""
    check_finite_result(result)
    files = files or OutputFiles()
    folder = Path(folder)
    field = result.field[0].detach().cpu().numpy()
    names: dict[str, str] = {"warped": "warped.nii.gz", "field": "field.nii.gz"}
    itk = files.itk and io.itk_field_supported(result.fixed)
    if itk:
        names["field_itk"] = "field_itk.nii.gz"
    writes: list[Callable[[], Any]] = [
        functools.partial(_write_field_files, folder, "field", field, result.fixed, itk),
        functools.partial(io.save_image, result.warped, folder / "warped.nii.gz"),
    ]
    for name, labels in result.warped_labels.items():
        names[f"warped_{name}"] = f"warped_{name}.nii.gz"
        writes.append(functools.partial(io.save_image, labels, folder / names[f"warped_{name}"]))
    if result.world_matrix is not None:
        names["affine"] = "affine.txt"
        writes.append(functools.partial(io.write_itk_affine, folder / "affine.txt", result.world_matrix))
    parallel = side_by_side(result.fixed.array.size)
    with (
        torch_threads(1 if parallel else None),  # the jobs share the cores, one torch thread each
        output_executor(result.fixed.array.size, len(writes)) as pool,
        ThreadPoolExecutor(1) as drawing,
        ThreadPoolExecutor(1) as measuring,
    ):
        futures = [pool.submit(write) for write in writes]
        metrics_done: Future = Future()
        try:
            if parallel:  # the metrics and the figure meanwhile, the figure's title (the metrics) last
                measured = measuring.submit(result.finish_metrics)
                if figure:
                    title = functools.partial(_title_when_done, metrics_done)
                    futures.append(drawing.submit(_save_figure, result, field, folder / "figure.png", title))
            payload_inverse = _write_inverse(result, pool, folder, itk, names, futures) if files.inverse else None
            metrics_done.set_result(measured.result() if parallel else result.finish_metrics())
        except BaseException as exc:
            if not metrics_done.done():
                metrics_done.set_exception(exc)  # the figure stops waiting
            raise
        if figure:
            names["figure"] = "figure.png"
        if figure and not parallel:  # in turn: after the metrics
            futures.append(pool.submit(_save_figure, result, field, folder / "figure.png"))
    for future in futures:
        future.result()
    payload = dict(result.metrics)
    payload["inverse"] = payload_inverse if payload_inverse is not None else INVERSE_NOT_ASKED
    if not files.itk:
        payload["field_itk"] = ITK_FIELD_NOT_ASKED
    elif not itk:  # a 2D slice tilted out of the x-y plane: the voxreg fields (field*.nii.gz) still hold it
        payload["field_itk"] = ITK_FIELD_SKIPPED
    names["metrics"] = "metrics.json"
    payload["outputs"] = sorted(names.values())
    write_json(folder / "metrics.json", payload)
    return names


def _write_inverse(
    result: RegistrationResult, pool: Executor, folder: Path, itk: bool, names: dict[str, str], futures: list[Future]
) -> dict[str, Any]:
    """Invert ``result.field`` on this thread and hand its files to ``pool`` (their names to
    ``names``, their futures to ``futures``); returns metrics.json's ``inverse`` entry."""
    inverse, payload = inverse_field(result)
    release_memory_above(result.fixed.array.size)
    names["field_inverse"] = "field_inverse.nii.gz"
    futures.append(pool.submit(io.save_field, folder / "field_inverse.nii.gz", inverse, result.fixed))
    if itk:
        names["field_itk_inverse"] = "field_itk_inverse.nii.gz"
        futures.append(pool.submit(io.save_itk_field, folder / "field_itk_inverse.nii.gz", inverse, result.fixed))
    return payload  # the writes hold the inverse while they need it


def _write_field_files(folder: Path, stem: str, field: np.ndarray, fixed: Image, itk: bool) -> None:
    """``<stem>.nii.gz`` and, when ``itk``, ``<stem>_itk.nii.gz`` of ``field``, one after the
    other, each reordered a few MB at a time while it is written (:func:`voxreg.io.save_field`)."""
    io.save_field(folder / f"{stem}.nii.gz", field, fixed)
    if itk:
        io.save_itk_field(folder / f"{stem}_itk.nii.gz", field, fixed)


def inverse_field(result: RegistrationResult) -> tuple[np.ndarray, dict[str, Any]]:
    """The inverse of ``result.field`` as a float32 ``(ndim, *S)`` array in fixed voxels: from
    the engine's own when it gave one (``result.inverse``: a network alone integrates its
    negated velocity; :func:`network_inverse`), else from
    :func:`voxreg.core.spatial.invert_displacement` (:func:`composed_inverse`), each polished against
    the forward map (:func:`polish_inverse`; on a grid of more than :data:`HALF_RES_INVERSE_ABOVE`
    voxels: not polished, and the fixed point at half resolution only); and
    metrics.json's ``inverse`` entry: how it was made, its seconds and the round trips in
    voxels over the fixed scan's foreground voxels (:func:`foreground_index`; every k-th of
    them beyond :data:`RESIDUAL_VOXELS`), mean, 99th percentile and maximum of each:
    ``residual_*`` = ``|u(x) + u_inv(x + u(x))|`` (inverse after forward) and
    ``forward_after_inverse_*`` = ``|u_inv(y) + u(y + u_inv(y))|``."""
    field = result.field.detach().to("cpu", torch.float32)
    foreground = foreground_index(result.fixed)
    index = foreground[:: -(-foreground.numel() // RESIDUAL_VOXELS)].contiguous()  # every k-th on a large grid
    start = time.perf_counter()
    if result.inverse is not None:  # the engine's own, polished in place: the result keeps the better one
        steps = CASCADE_NEWTON_STEPS if int(result.metrics.get("network_passes", 1)) > 1 else NETWORK_NEWTON_STEPS
        method, inverse = network_inverse(field, result.inverse.detach().to("cpu", torch.float32), index, steps)
    elif bool(field.any()):
        method, inverse = composed_inverse(field, index)
    else:
        method, inverse = "identity", torch.zeros_like(field)
    seconds = time.perf_counter() - start
    residual = spatial.inverse_residual(field, inverse, index).numpy()
    backward = spatial.inverse_residual(inverse, field, index).numpy()  # forward after inverse
    stats = {"method": method, "seconds": seconds}
    for prefix, values in (("residual", residual), ("forward_after_inverse", backward)):
        stats[f"{prefix}_mean_voxels"] = float(values.mean()) if values.size else 0.0
        stats[f"{prefix}_p99_voxels"] = float(np.percentile(values, 99)) if values.size else 0.0
        stats[f"{prefix}_max_voxels"] = float(values.max()) if values.size else 0.0
    stats |= {"foreground_voxels": int(foreground.numel()), "residual_voxels": int(residual.size)}
    return inverse[0].numpy(), stats


def network_inverse(
    field: torch.Tensor, exact: torch.Tensor, index: torch.Tensor, newton_steps: int = NETWORK_NEWTON_STEPS
) -> tuple[str, torch.Tensor]:
    """(how, inverse) of a network's field from the network's own inverse ``exact`` (its
    velocity negated and integrated on the model grid, then mapped onto the fixed grid; for a
    cascade, each pass's composed in the reverse order), polished in place (``exact`` becomes
    the polished inverse) against the forward map (:func:`polish_inverse`, ``newton_steps``)
    on a grid of at most :data:`HALF_RES_INVERSE_ABOVE` voxels. The integration on a ~2 mm model grid is not
    exact where a fine-branch field (``brain-real``) stretches strongly: on the 1 mm pair 2->1
    its round trip was 0.22 / 1.08 voxel (mean / p99), polished 0.055 / 0.331."""
    if field[0, 0].numel() > HALF_RES_INVERSE_ABOVE:
        return "the network's: its velocity negated and integrated", exact
    method = "the network's (its velocity negated and integrated), " + polish_note(newton_steps)
    # polished in place: no full-size copy (a 1 mm brain's 126 MB, ~30,000 fresh pages); in
    # inference mode, where the network's inverse was made
    with torch.inference_mode():
        return method, polish_inverse(field, exact, index, newton_steps, inplace=True)


def composed_inverse(field: torch.Tensor, index: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(how, inverse) of a field the engine knows no inverse of (instance optimisation, a
    refined network): fixed-point inversion (one full-resolution step), polished against the
    forward map (:func:`polish_inverse`); on a grid of more than
    :data:`HALF_RES_INVERSE_ABOVE` voxels the half-resolution stage only, not polished."""
    if field[0, 0].numel() > HALF_RES_INVERSE_ABOVE:
        return "fixed-point inversion at half resolution", spatial.invert_displacement(field, 0)
    inverse = polish_inverse(field, spatial.invert_displacement(field, 1), index, inplace=True)
    return "fixed-point inversion, " + polish_note(NEWTON_STEPS), inverse


def polish_note(newton_steps: int) -> str:
    """How :func:`polish_inverse` polished an inverse, for metrics.json's ``inverse.method``."""
    return (
        f"then {newton_steps} Newton step(s) per node where the mapped foreground voxels land and "
        f"{FIT_SWEEPS} least-squares sweep(s) at the fixed scan's foreground voxels"
    )


def polish_inverse(
    field: torch.Tensor,
    inverse: torch.Tensor,
    index: torch.Tensor,
    newton_steps: int = NEWTON_STEPS,
    inplace: bool = False,
) -> torch.Tensor:
    """An approximate ``inverse`` of ``field`` made consistent with it both ways around the
    fixed scan's foreground voxels ``index``: ``newton_steps`` Newton steps at the nodes the
    mapped voxels reach (forward after inverse: ``voxreg warp --inverse``), then
    :data:`FIT_SWEEPS` least-squares sweep(s) at the voxels (inverse after forward); on one
    copy of ``inverse``, or on ``inverse`` itself when ``inplace``."""
    weight = spatial.mapped_weight(field, index)  # where the mapped voxels fall: both stages use it
    nodes = spatial.reached_nodes(field, index, weight)
    polished = spatial.newton_inverse(field, inverse, nodes, newton_steps, inplace=inplace)
    return spatial.fit_inverse(field, polished, index, FIT_SWEEPS, inplace=True, weight=weight)


def foreground_index(image: Image, fraction: float = 0.05) -> torch.Tensor:
    """Flat indices of ``image``'s foreground: voxels above ``fraction`` of its robust
    intensity range (0.5-99.5th percentiles of a strided sample, over nonzero voxels for a
    zero background: the brain of a skull-stripped scan, the body of a CT); every voxel of an
    image without any (a constant one)."""
    values = np.asarray(image.array).reshape(-1)
    sample = values[:: max(1, values.size // 500_000)]
    low, high = io.robust_range(sample.astype(np.float32, copy=False), 0.5, 99.5)
    index = np.flatnonzero(values > low + fraction * (high - low))
    return torch.from_numpy(index if index.size else np.arange(values.size))


def check_finite_result(result: RegistrationResult) -> None:
    """Raise VoxregError when the field, the affine or a warped image holds NaN/Inf."""
    # a sum is NaN/Inf when any term is (finite for the values of real fields and images): no masks
    if not math.isfinite(float(result.field.sum())):
        raise VoxregError("registration failed: the displacement field contains NaN/Inf (e.g. a NaN model)")
    if result.world_matrix is not None and not np.all(np.isfinite(result.world_matrix)):
        raise VoxregError("registration failed: the affine matrix contains NaN/Inf")
    warped = result.warped.array
    if np.issubdtype(warped.dtype, np.floating) and not math.isfinite(float(warped.sum(dtype=np.float64))):
        raise VoxregError("registration failed: the warped image contains NaN/Inf")


def _save_figure(
    result: RegistrationResult, field: np.ndarray, path: Path, title: Callable[[], str] | None = None
) -> Path:
    """figure.png: orthogonal mid-slices of fixed, moving, warped, difference and grid; its
    title from ``result.metrics``, or from ``title()`` once the panels are drawn when given."""
    from voxreg.viz.registration_figure import registration_figure

    return registration_figure(
        result.fixed.array,
        result.moving.array,
        result.warped.array,
        field,
        path,
        title=title if title is not None else figure_title(result.metrics),
        affine=result.fixed.affine,
    )


def _title_when_done(metrics_done: Future) -> str:
    """The figure's title once the metrics (``metrics_done``'s result) are computed."""
    return figure_title(metrics_done.result())


def figure_title(values: Mapping[str, Any]) -> str:
    """One-line figure title: engine, NCC and Dice by stage (:func:`stage_measures`), folding."""
    parts = [f"{values.get('engine', '')}", *stage_measures(values)]
    if "folding_percent" in values:
        parts.append(f"folding {values['folding_percent']:.3f}%")
    return "   ".join(p for p in parts if p)


def stage_measures(values: Mapping[str, Any], dice_name: str = "Dice") -> list[str]:
    """``["NCC a -> b (affine) -> c", "<dice_name> ..."]`` from metrics.json ``values``: the
    raw moving scan, after the affine stage (when one ran and the deformable stage followed),
    after registration. metrics.json names the stages differently for the two measures
    (``similarity.ncc_raw`` / ``ncc_before`` / ``ncc_after``; ``dice_mean_before`` /
    ``dice_mean_affine`` / ``dice_mean_after``), so the figure and the command's summary line
    spell them out the same way."""
    sim = values.get("similarity", {})
    deformable = values.get("engine") != "affine"
    lines = []
    if "ncc_before" in sim:
        stages = [sim.get("ncc_raw"), sim["ncc_before"] if deformable else None, sim["ncc_after"]]
        lines.append("NCC " + _stages(stages))
    if "dice_mean_after" in values:
        stages = [values.get("dice_mean_before"), values.get("dice_mean_affine") if deformable else None]
        lines.append(f"{dice_name} " + _stages([*stages, values["dice_mean_after"]]))
    return lines


def _stages(values: Sequence[float | None]) -> str:
    """``"a -> b (affine) -> c"`` from (raw, affine, final), leaving out the missing ones; the
    middle one is the affine stage's only when the raw one precedes it."""
    raw, affine, final = values
    parts = [] if raw is None else [f"{raw:.3f}"]
    if affine is not None:
        parts.append(f"{affine:.3f}" + (" (affine)" if raw is not None else ""))
    return " -> ".join([*parts, f"{final:.3f}"])


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Atomically write ``payload`` as indented strict JSON: numpy values converted,
    NaN/Inf written as null (``allow_nan=False`` guards the rest)."""
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars/arrays as Python values, non-finite floats as None,
    tuples as lists, non-string keys as strings and anything else unknown as its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------- backwards


def inverse_field_path(field_path: str | Path) -> Path:
    """Where the inverse of a saved field lives: ``field.nii.gz`` -> ``field_inverse.nii.gz``
    beside it (``<name>_inverse<ext>`` for any other name)."""
    path = Path(field_path)
    return path.with_name(f"{io.strip_extension(path)}_inverse{io.extension(path)}")


def read_inverse_field(field_path: str | Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """The inverse of the voxreg field at ``field_path``: the file of :func:`inverse_field_path`
    (checked to share its grid) or, when absent (``register --no-inverse``, an older run),
    computed from it as ``register`` computes a composed field's (:func:`composed_inverse`:
    fixed point, then polished at the foreground voxels of the ``warped.nii.gz`` beside it,
    :func:`saved_foreground_index`). Returns ``(inverse (ndim, *S) in fixed voxels, fixed 4x4
    affine, computed)``."""
    sibling = inverse_field_path(field_path)
    if sibling.exists():  # the forward field's header is enough to check the grid
        shape, fixed_affine = io.field_grid(field_path)
        inverse, affine = io.load_field(sibling)
        if inverse.shape != shape or not np.allclose(affine, fixed_affine, atol=1e-4):
            raise VoxregError(f"{sibling}: not on the grid of {field_path} (shape {inverse.shape} vs {shape})")
        return inverse, fixed_affine, False
    field, fixed_affine = io.load_field(field_path)
    if not np.all(np.isfinite(field)):
        raise VoxregError(f"{field_path}: the field contains NaN/Inf")
    _, inverse_t = composed_inverse(torch.from_numpy(field)[None], saved_foreground_index(field_path, field.shape[1:]))
    return inverse_t[0].numpy(), fixed_affine, True


def saved_foreground_index(field_path: str | Path, shape: Sequence[int]) -> torch.Tensor:
    """Flat foreground indices (:func:`foreground_index`) of the ``warped.nii.gz`` that
    ``register`` wrote beside ``field_path`` (the moving scan on the fixed grid, whose foreground
    is where the registration holds), or every voxel of ``shape`` when it is absent, unreadable
    or on another grid."""
    warped = Path(field_path).with_name("warped.nii.gz")
    try:
        image = io.load_image(warped) if warped.exists() else None
    except VoxregError:
        image = None
    if image is None or tuple(image.shape) != tuple(shape):
        return torch.arange(math.prod(int(n) for n in shape))
    return foreground_index(image)


def inverse_resample(
    image: Image,
    reference: Image,
    inverse: np.ndarray | torch.Tensor,
    fixed_affine: np.ndarray,
    world_matrix: np.ndarray | None = None,
    nearest: bool | None = None,
    device: torch.device | str = "cpu",
) -> Image:
    """``image`` (in the fixed scan's space, e.g. atlas labels) on ``reference``'s grid (the
    moving scan): a reference voxel ``y`` at world point ``q`` takes the value of ``image`` at
    ``phi^-1(A^-1 q)``, where ``A`` is ``world_matrix`` (fixed -> moving world, RAS mm) and
    ``phi^-1(z) = z + inverse(z)`` (``inverse`` ``(ndim, *S)`` in voxels of the fixed grid of
    ``fixed_affine``). The inverse is brought onto the reference grid as a displacement in
    reference voxels, so :func:`voxreg.io.resample_to` samples ``image`` once (label maps
    nearest neighbour in their own dtype)."""
    ndim = reference.ndim
    inverse_t = torch.as_tensor(inverse, dtype=torch.float32, device=device)
    inverse_t = inverse_t if inverse_t.dim() == ndim + 2 else inverse_t[None]
    if inverse_t.shape[1] != ndim:
        raise VoxregError(f"{reference.path or 'reference'} is {ndim}D but the field is {inverse_t.shape[1]}D")
    to_fixed = None if world_matrix is None else np.linalg.inv(check_affine(world_matrix, "the affine transform"))
    matrix = voxel_matrix(reference.affine, fixed_affine, ndim, to_fixed)  # reference voxel -> fixed voxel
    fixed_voxels = spatial.mapped_points(matrix, reference.shape, device=device).reshape(1, ndim, *reference.shape)
    displacement = spatial.sample(inverse_t, fixed_voxels, padding="border")  # fixed voxels, at those points
    back = torch.as_tensor(np.linalg.inv(matrix[:ndim, :ndim]), dtype=torch.float32, device=device)
    in_reference = torch.einsum("ij,bj...->bi...", back, displacement)
    return io.resample_to(image, reference, to_fixed, nearest, device, field=in_reference)


def load_warp_input(image: Image | str | Path, nearest: bool | None) -> Image:
    """An image to warp: integer files (and integer-valued float files with few values, i.e.
    label maps saved as float) load as label maps unless ``nearest`` is False."""
    if isinstance(image, Image):
        return image
    if nearest is not None or io.stored_as_integer(image):
        return io.load_image(image, label=nearest is not False)
    loaded = io.load_image(image)
    return io.as_label_image(loaded) if io.has_label_values(loaded.array) else loaded


def apply_inverse_field(
    field_path: str | Path,
    image: Image | str | Path,
    reference: Image | str | Path,
    nearest: bool | None = None,
    affine_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> Image:
    """A saved registration applied backwards: ``image`` from the fixed scan's space onto the
    grid of ``reference`` (the moving scan) through the inverse affine (``affine_path``, ITK
    text, fixed -> moving) and the inverse field (:func:`read_inverse_field`)."""
    inverse, fixed_affine, _ = read_inverse_field(field_path)
    loaded = load_warp_input(image, nearest)
    grid = reference if isinstance(reference, Image) else io.load_image(reference)
    for item in (loaded, grid):
        if item.ndim != inverse.shape[0]:
            raise VoxregError(f"{item.path}: image is {item.ndim}D but the field {field_path} is {inverse.shape[0]}D")
    world_matrix = io.read_itk_affine(affine_path) if affine_path is not None else None
    if world_matrix is not None:
        check_affine(world_matrix, str(affine_path))
    return inverse_resample(loaded, grid, inverse, fixed_affine, world_matrix, nearest, resolve_device(device))
