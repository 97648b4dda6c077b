"""The Python surface of voxreg: ``register()``, ``warp_image()``, ``apply_field()``.

One registration follows DESIGN.md's data flow: load -> (affine) -> resample the moving
scan onto the fixed grid in world space -> normalise -> predict (network) and/or
optimise (instance optimisation) a displacement field -> warp image and label maps
with ONE interpolation from the original moving grid -> metrics -> outputs.
The field is in voxels of the fixed grid, ``(1, ndim, *fixed.shape)``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.core import spatial
from voxreg.registration.instance import AlignConfig, align
from voxreg.core.errors import VoxregError
from voxreg.core.runtime import resolve_device
from voxreg.core.image import Image

ImageLike = Image | str | Path
ProgressCallback = Callable[[int, int], None]


def as_image(image: ImageLike, label: bool = False) -> Image:
    """Load ``image`` when it is a path; intensity images are checked for NaN/empty/constant."""
    loaded = image if isinstance(image, Image) else io.load_image(image, label=label)
    if label and not loaded.is_label:
        loaded = io.as_label_image(loaded)
    if not label:
        io.check_intensity_image(loaded)
    return loaded


def _check_pair(fixed: Image, moving: Image) -> None:
    if fixed.ndim != moving.ndim:
        raise VoxregError(f"{moving.path or 'moving'} is {moving.ndim}D but {fixed.path or 'fixed'} is "
                          f"{fixed.ndim}D: both scans must have the same dimensionality")


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def warp_image(moving: Image, fixed: Image, field: torch.Tensor | np.ndarray | None = None,
               world_matrix: np.ndarray | None = None, nearest: bool | None = None,
               device: torch.device | str = "cpu") -> Image:
    """Resample ``moving`` onto ``fixed``'s grid through ``world_matrix`` (fixed world ->
    moving world, RAS mm) and a displacement ``field`` in fixed voxels, with a single
    interpolation (see :func:`voxreg.io.resample_to`). Label maps use nearest neighbour."""
    return io.resample_to(moving, fixed, world_matrix, nearest, device, field=field)


@dataclass
class RegistrationResult:
    """Everything one registration produced; ``save()`` writes the standard outputs."""

    fixed: Image
    moving: Image
    warped: Image
    field: torch.Tensor
    warped_labels: dict[str, Image] = dataclass_field(default_factory=dict)
    world_matrix: np.ndarray | None = None
    metrics: dict[str, Any] = dataclass_field(default_factory=dict)

    def save(self, outdir: str | Path, figure: bool = True) -> dict[str, Path]:
        """Write warped image, labels, fields (voxreg + ITK), metrics.json and figure.png
        into ``outdir``; each file is written to a temporary name and renamed."""
        outdir = io.ensure_output_dir(outdir)
        field = self.field[0].detach().cpu().numpy()
        written: dict[str, Path] = {}
        written["warped"] = io.save_image(self.warped, outdir / "warped.nii.gz")
        for name, labels in self.warped_labels.items():
            written[f"warped_{name}"] = io.save_image(labels, outdir / f"warped_{name}.nii.gz")
        written["field"] = io.save_field(outdir / "field.nii.gz", field, self.fixed)
        if io.itk_field_supported(self.fixed):
            written["field_itk"] = io.save_itk_field(outdir / "field_itk.nii.gz", field, self.fixed)
        else:  # a 2D slice tilted out of the x-y plane: the voxreg field (field.nii.gz) still holds it
            self.metrics["field_itk"] = "not written: ITK 2D fields need an image plane parallel to x-y"
        if self.world_matrix is not None:
            written["affine"] = io.write_itk_affine(outdir / "affine.txt", self.world_matrix)
        if figure:
            from voxreg.viz.registration_figure import registration_figure
            written["figure"] = registration_figure(
                self.fixed.array, self.moving.array, self.warped.array, field,
                outdir / "figure.png", title=_figure_title(self.metrics), affine=self.fixed.affine)
        written["metrics"] = _write_json(outdir / "metrics.json", self.metrics)
        return {k: Path(v) for k, v in written.items()}


def _figure_title(values: Mapping[str, Any]) -> str:
    parts = [f"{values.get('engine', '')}"]
    sim = values.get("similarity", {})
    if "ncc_before" in sim:
        parts.append(f"NCC {sim['ncc_before']:.3f} -> {sim['ncc_after']:.3f}")
    if "dice_mean_after" in values:
        parts.append(f"Dice {values.get('dice_mean_before', float('nan')):.3f} -> {values['dice_mean_after']:.3f}")
    if "folding_percent" in values:
        parts.append(f"folding {values['folding_percent']:.3f}%")
    return "   ".join(p for p in parts if p)


def _write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _predict_with_model(model_path: str | Path, fixed: torch.Tensor, moving: torch.Tensor,
                        lam: float | None, device: torch.device) -> torch.Tensor:
    from voxreg.nn import load_checkpoint

    model, extra = load_checkpoint(model_path, device=device)
    if model.config.ndim != fixed.dim() - 2:
        raise VoxregError(f"{model_path}: model is {model.config.ndim}D but the images are {fixed.dim() - 2}D")
    with torch.inference_mode():
        output = model(moving, fixed, lam=_model_lambda(model, extra, lam, model_path))
    return output.field.clone()


def _model_lambda(model: Any, extra: Mapping[str, Any], lam: float | None, path: str | Path) -> float | None:
    """λ for a λ-conditional network (given, or the training's validation λ); None otherwise."""
    if not model.config.lambda_conditional:
        return None
    if lam is None:
        from voxreg.training.trainer import TrainConfig

        saved = extra.get("train_config")
        lam = TrainConfig.from_dict(saved).validation_lambda if saved else 1.0
    if lam <= 0:
        raise VoxregError(f"--lambda must be > 0 for the lambda-conditional model {path}, got {lam}")
    return float(lam)


def _label_maps(labels: Sequence[ImageLike] | Mapping[str, ImageLike] | None) -> dict[str, Image]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {name: as_image(img, label=True) for name, img in labels.items()}
    maps: dict[str, Image] = {}
    for index, img in enumerate(labels):
        loaded = as_image(img, label=True)
        name = loaded.name if loaded.path is not None else f"labels{index}"
        maps[name if name not in maps else f"{name}_{index}"] = loaded
    return maps


def register(fixed: ImageLike, moving: ImageLike, *, model: str | Path | None = None,
             similarity: str = "ncc", lam: float | None = None, refine: int = 0,
             device: str | torch.device = "auto", moving_labels: Sequence[ImageLike] | Mapping[str, ImageLike] | None = None,
             fixed_labels: ImageLike | None = None, world_matrix: np.ndarray | None = None,
             affine: bool = True, affine_only: bool = False, affine_config: Any = None,
             config: AlignConfig | None = None, progress: ProgressCallback | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and return a :class:`RegistrationResult`.

    Without ``model`` the field comes from instance optimisation (``config`` or defaults
    with ``similarity``/``lam``); with a checkpoint the network predicts it, optionally
    refined by ``refine`` optimisation steps. An affine pre-alignment in world space runs
    first unless ``affine=False`` or an explicit ``world_matrix`` (fixed world -> moving world,
    RAS mm) is given; ``affine_only`` stops after it. Label maps are carried with nearest
    neighbour; Dice is reported when ``fixed_labels`` is given too.
    """
    total_start = time.perf_counter()
    fixed_img, moving_img = as_image(fixed), as_image(moving)
    _check_pair(fixed_img, moving_img)
    label_maps = _label_maps(moving_labels)
    fixed_label_img = as_image(fixed_labels, label=True) if fixed_labels is not None else None
    for labels in [*label_maps.values(), *([fixed_label_img] if fixed_label_img is not None else [])]:
        _check_pair(fixed_img, labels)
    torch_device = resolve_device(device)
    values: dict[str, Any] = {}
    if world_matrix is None and (affine or affine_only):
        if affine_config is None and similarity == "mi":  # multi-modal pair: MI for the affine stage too
            from voxreg.registration.affine import AffineConfig

            affine_config = AffineConfig(similarity="mi")
        world_matrix, values["affine"] = _affine_stage(fixed_img, moving_img, affine_config)
    moving_on_fixed = warp_image(moving_img, fixed_img, world_matrix=world_matrix, device=torch_device)
    fixed_t = _to_tensor(io.normalize_intensity(fixed_img.array), torch_device)
    moving_t = _to_tensor(io.normalize_intensity(moving_on_fixed.array), torch_device)
    config = _align_config(config, similarity, lam)
    start = time.perf_counter()
    if affine_only:
        engine, field = "affine", torch.zeros(1, fixed_img.ndim, *fixed_img.shape, device=torch_device)
    else:
        engine, field = _estimate_field(fixed_t, moving_t, model, config, lam, refine, torch_device, progress)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    warped = warp_image(moving_img, fixed_img, field, world_matrix, device=torch_device)
    pipeline_seconds = time.perf_counter() - total_start  # affine + deformable + warp, no metrics
    warped_labels = {name: warp_image(lab, fixed_img, field, world_matrix, device=torch_device)
                     for name, lab in label_maps.items()}
    values.update({"engine": engine, "device": str(torch_device), "registration_seconds": seconds,
                   "pipeline_seconds": pipeline_seconds,
                   "similarity_loss": config.similarity, "lambda": config.lam if model is None else lam,
                   "fixed": str(fixed_img.path or ""), "moving": str(moving_img.path or "")})
    values.update(metrics.jacobian_stats(field))
    values["similarity"] = _similarity_metrics(fixed_t, moving_t, field)
    if "affine" in values:
        values["similarity"].update(_before_affine_similarity(fixed_img, moving_img, fixed_t, torch_device))
    if fixed_label_img is not None and label_maps:
        values.update(_dice_metrics(fixed_label_img, fixed_img, label_maps, warped_labels,
                                    world_matrix, torch_device))
    values["total_seconds"] = time.perf_counter() - total_start
    return RegistrationResult(fixed_img, moving_on_fixed, warped, field.detach().cpu(), warped_labels,
                              world_matrix, values)


def _affine_stage(fixed: Image, moving: Image, config: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Affine pre-alignment in world space; returns the matrix and its metrics."""
    from voxreg.registration.affine import affine_register

    result = affine_register(fixed, moving, config)
    return result.world_matrix, {"seconds": result.seconds, "init": result.init,
                                 "similarity_before": result.similarity_before,
                                 "similarity_after": result.similarity_after}


def _before_affine_similarity(fixed: Image, moving: Image, fixed_t: torch.Tensor,
                              device: torch.device) -> dict[str, float]:
    """NCC/MI of the raw moving scan on the fixed grid (before any alignment)."""
    raw = warp_image(moving, fixed, device=device)
    raw_t = _to_tensor(io.normalize_intensity(raw.array), device)
    return {f"{key}_raw": value for key, value in metrics.similarities(fixed_t, raw_t).items()}


def _align_config(config: AlignConfig | None, similarity: str, lam: float | None) -> AlignConfig:
    if config is not None:
        return config
    try:
        return AlignConfig(similarity=similarity, lam=lam)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None


def _estimate_field(fixed: torch.Tensor, moving: torch.Tensor, model: str | Path | None, config: AlignConfig,
                    lam: float | None, refine: int, device: torch.device,
                    progress: ProgressCallback | None) -> tuple[str, torch.Tensor]:
    if model is None:
        return "instance-optimisation", align(fixed, moving, config, progress=progress).field
    field = _predict_with_model(model, fixed, moving, lam, device)
    if refine <= 0:
        return "network", field
    refined = align(fixed, moving, config.refinement(refine), initial_field=field, progress=progress)
    return f"network+refine{refine}", refined.field


def _similarity_metrics(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        warped = spatial.warp(moving, field)
        return metrics.similarity_report(fixed, moving, warped)


def _dice_metrics(fixed_labels: Image, fixed: Image, moving_labels: dict[str, Image],
                  warped_labels: dict[str, Image], world_matrix: np.ndarray | None,
                  device: torch.device) -> dict[str, Any]:
    """Dice of the first moving label map against the fixed one: raw (before any
    alignment), after the affine stage when one ran, and after the full registration."""
    if fixed_labels.shape != fixed.shape or not np.allclose(fixed_labels.affine, fixed.affine, atol=1e-3):
        fixed_labels = warp_image(fixed_labels, fixed, device=device)
    name, moving = next(iter(moving_labels.items()))
    labels = sorted(set(np.unique(fixed_labels.array)) & set(np.unique(moving.array)) - {0})
    stages = {"before": warp_image(moving, fixed, device=device), "after": warped_labels[name]}
    if world_matrix is not None:
        stages["affine"] = warp_image(moving, fixed, None, world_matrix, device=device)
    scores = {stage: metrics.dice_per_label(fixed_labels.array, img.array, labels) for stage, img in stages.items()}
    values: dict[str, Any] = {"dice_labels": name}
    for stage, per_label in scores.items():
        values[f"dice_mean_{stage}"] = float(np.nanmean(list(per_label.values()))) if per_label else float("nan")
    values["dice_per_label"] = {int(k): {stage: scores[stage][k] for stage in scores} for k in labels}
    return values


def apply_field(field_path: str | Path, image: ImageLike, nearest: bool | None = None,
                affine_path: str | Path | None = None, device: str | torch.device = "cpu") -> Image:
    """Apply a saved voxreg field (and optional ITK affine text) to ``image``; returns it
    on the field's (fixed) grid. ``nearest`` defaults to True for integer label maps."""
    field, fixed_affine = io.load_field(field_path)
    loaded = image if isinstance(image, Image) else io.load_image(image, label=bool(nearest))
    grid = Image(np.zeros(field.shape[1:], dtype=np.float32), fixed_affine)
    if loaded.ndim != grid.ndim:
        raise VoxregError(f"{loaded.path}: image is {loaded.ndim}D but the field {field_path} is {grid.ndim}D")
    world_matrix = io.read_itk_affine(affine_path) if affine_path is not None else None
    return warp_image(loaded, grid, torch.from_numpy(field)[None], world_matrix, nearest, resolve_device(device))
