"""The Python surface of voxreg: ``register()``, ``warp_image()``, ``apply_field()``.

One registration follows DESIGN.md's data flow: load -> (affine) -> resample the moving
scan onto the fixed grid in world space -> normalise -> predict (network) and/or
optimise (instance optimisation) a displacement field -> warp image and label maps
with ONE interpolation from the original moving grid. Metrics are computed only when
asked (:func:`voxreg.registration.outputs.measure_registration`); files are written by
:meth:`RegistrationResult.save` (:mod:`voxreg.registration.outputs`).
The field is in voxels of the fixed grid, ``(1, ndim, *fixed.shape)``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import io
from voxreg.core.config import check_choice, check_int, check_number
from voxreg.core.errors import VoxregError
from voxreg.core.grid import check_affine
from voxreg.core.image import Image
from voxreg.core.runtime import configure_allocator, network_precision, release_memory_above, resolve_device
from voxreg.registration.instance import AlignConfig, align
from voxreg.registration.outputs import RegistrationResult, measure_registration

#: deformable engines of :func:`register`: auto (a shipped model when one suits, else instance optimisation)
ENGINES = ("auto", "network", "instance")
#: the most passes of a network cascade (``register(passes=...)``): each costs a forward pass and a warp
MAX_PASSES = 8

__all__ = ["RegistrationResult", "apply_field", "as_image", "measure_registration", "register", "warp_image"]

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
    """Raise VoxregError unless both images have the same number of dimensions."""
    if fixed.ndim != moving.ndim:
        raise VoxregError(
            f"{moving.path or 'moving'} is {moving.ndim}D but {fixed.path or 'fixed'} is "
            f"{fixed.ndim}D: both scans must have the same dimensionality"
        )


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(1, 1, *S)`` float32 tensor of ``array`` on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def warp_image(
    moving: Image,
    fixed: Image,
    field: torch.Tensor | np.ndarray | None = None,
    world_matrix: np.ndarray | None = None,
    nearest: bool | None = None,
    device: torch.device | str = "cpu",
) -> Image:
    """Resample ``moving`` onto ``fixed``'s grid through ``world_matrix`` (fixed world ->
    moving world, RAS mm) and a displacement ``field`` in fixed voxels, with a single
    interpolation (see :func:`voxreg.io.resample_to`). Label maps use nearest neighbour."""
    return io.resample_to(moving, fixed, world_matrix, nearest, device, field=field)


def _predict_with_model(
    model_path: str | Path,
    fixed: Image,
    moving: Image,
    lam: float | None,
    device: torch.device,
    world_matrix: np.ndarray | None = None,
    inverse: bool = False,
    symmetric: bool = False,
    passes: int = 1,
) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
    """(field, inverse) in voxels of the fixed grid predicted by the checkpoint at
    ``model_path`` for an affine-aligned pair (``moving`` on the fixed grid, or through
    ``world_matrix``), in the model's space when the checkpoint records one, by ``passes``
    passes of the network (a cascade: :func:`voxreg.registration.network.predict_fields`).
    The inverse (a function computing it on the fixed grid) is the network's own when
    ``inverse`` and it is diffeomorphic, else None."""
    from voxreg.registration.network import model_space_of, predict_fields

    model, extra = loaded_checkpoint(model_path, device)
    if model.config.ndim != fixed.ndim:
        raise VoxregError(f"{model_path}: model is {model.config.ndim}D but the images are {fixed.ndim}D")
    space = model_space_of(extra, str(model_path))
    lam = _model_lambda(model, extra, lam, model_path)
    return predict_fields(model, space, fixed, moving, lam, device, world_matrix, inverse, symmetric, passes)


_CHECKPOINTS: dict[tuple[str, int, int, str], tuple[Any, dict[str, Any]]] = {}


def loaded_checkpoint(path: str | Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The network and extras of a checkpoint, read once per process (keyed by path, size,
    modification time and device), so many registrations with one model load it once.
    Inference never changes the model (eval mode, inference_mode)."""
    from voxreg.nn import load_checkpoint

    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return load_checkpoint(path, device=device)  # reports the missing file in one line
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, str(device))
    if key not in _CHECKPOINTS:
        if len(_CHECKPOINTS) >= 4:
            _CHECKPOINTS.pop(next(iter(_CHECKPOINTS)))
        _CHECKPOINTS[key] = load_checkpoint(path, device=device)
    return _CHECKPOINTS[key]


def resolve_model(model: str | Path | None, engine: str, ndim: int) -> str | Path | None:
    """The checkpoint to run: a path, a shipped model's name (``voxreg models``), or for
    ``engine='auto'`` without a model the shipped default for ``ndim``-D scans (None: none
    ships, instance optimisation runs). ``engine='instance'`` never uses a network."""
    shipped = _shipped_choice(model, engine, ndim)
    if shipped is not None:
        return shipped.path
    return None if engine == "instance" else model


def _shipped_choice(model: str | Path | None, engine: str, ndim: int) -> Any:
    """The :class:`~voxreg.nn.shipped.ShippedModel` that runs (named, or the default for
    ``ndim``-D scans and ``engine``: :func:`~voxreg.nn.shipped.default_model`), or None (a
    checkpoint path, or no network)."""
    from voxreg.nn.shipped import default_model, find_shipped

    try:
        check_choice("engine", engine, ENGINES)
    except ValueError as exc:
        raise VoxregError(f"--{exc}") from None
    if engine == "instance":
        if model is not None:
            raise VoxregError("--engine instance and --model contradict each other: give one")
        return None
    if model is not None:
        if Path(model).exists() or any(sep in str(model) for sep in "/\\") or str(model).endswith(".pt"):
            return None
        return find_shipped(str(model))
    shipped = default_model(ndim, engine=engine)
    if shipped is None and engine == "network":
        raise VoxregError(f"--engine network: no shipped model registers {ndim}D scans; give --model CHECKPOINT")
    return shipped


def default_refinement(model: str | Path | None, engine: str, ndim: int) -> int:
    """Refinement steps when ``refine`` is not given: the shipped model's own (its card's
    ``refine``, measured on held-out pairs), 0 for a user checkpoint or no network."""
    return _card_refinement(_shipped_choice(model, engine, ndim))


def _card_refinement(shipped: Any) -> int:
    """A shipped model's default refinement steps (its card's ``refine``); 0 for none."""
    return 0 if shipped is None else int(shipped.card.get("refine", 0))


def refinement_lambda(model: str | Path | None, engine: str, ndim: int, similarity: str) -> float | None:
    """λ of the refinement after a shipped model when the user gives none: its card's
    ``refine_lambda`` (measured with NCC on held-out pairs), None for another similarity, a
    user checkpoint, no network or a card without one (then the similarity's default λ)."""
    shipped = _shipped_choice(model, engine, ndim)
    if shipped is None or str(similarity).lower() != "ncc" or "refine_lambda" not in shipped.card:
        return None
    return float(shipped.card["refine_lambda"])


def symmetric_inference(model: str | Path | None, engine: str, ndim: int, symmetric: bool | None) -> bool:
    """Whether the network averages its velocity over both directions: ``symmetric`` when
    given, else a shipped model's card (``symmetric_inference``, measured on held-out pairs),
    else False (a user checkpoint runs as trained)."""
    if symmetric is not None:
        return bool(symmetric)
    shipped = _shipped_choice(model, engine, ndim)
    return bool(shipped is not None and shipped.card.get("symmetric_inference", False))


def network_passes(model: str | Path | None, engine: str, ndim: int, passes: int | None) -> int:
    """How many times the network is applied (a cascade, each pass to the moving scan warped by
    the passes before it): ``passes`` when given, else a shipped model's card (``passes``,
    measured on held-out pairs), else 1."""
    if passes is not None:
        return int(passes)
    shipped = _shipped_choice(model, engine, ndim)
    return int(shipped.card.get("passes", 1)) if shipped is not None else 1


def _extent_mm(image: Image) -> np.ndarray:
    """Field of view of ``image`` per axis in mm (voxels x spacing)."""
    return np.asarray(image.shape, dtype=float) * image.spacing


def choose_model(
    model: str | Path | None, engine: str, fixed: Image, moving: Image, refine: int | None
) -> tuple[str | Path | None, int, str]:
    """(checkpoint or None, refinement steps, why this engine) for one pair. With
    ``engine='auto'`` and no ``model`` the shipped default runs only when its card covers
    both scans (:meth:`~voxreg.nn.shipped.ShippedModel.unsuited`); otherwise instance
    optimisation runs and the reason says why."""
    shipped = _shipped_choice(model, engine, fixed.ndim)
    if engine == "auto" and model is None and shipped is not None:
        for image in (fixed, moving):
            why = shipped.unsuited(image.spacing, _extent_mm(image))
            if why is not None:
                return None, 0 if refine is None else refine, f"shipped model {shipped.name} not used: {why}"
    if refine is None:
        refine = _card_refinement(shipped)
    path = shipped.path if shipped is not None else (None if engine == "instance" else model)
    if path is None:
        reason = "--engine instance" if engine == "instance" else f"no shipped model registers {fixed.ndim}D scans"
    else:
        reason = f"shipped model {shipped.name}" if shipped is not None else "--model checkpoint"
    return path, refine, reason


def _model_lambda(model: Any, extra: Mapping[str, Any], lam: float | None, path: str | Path) -> float | None:
    """λ for a λ-conditional network (given, or the training's validation λ); None otherwise."""
    if not model.config.lambda_conditional:
        return None
    if lam is None:
        lam = saved_validation_lambda(extra.get("train_config"))
    if lam <= 0:
        raise VoxregError(f"--lambda must be > 0 for the lambda-conditional model {path}, got {lam}")
    return float(lam)


def saved_validation_lambda(train_config: Mapping[str, Any] | None) -> float:
    """λ a training validated with, read from its saved config dict (no training import):
    ``lam``, or the geometric mean of ``lam_range`` when one was sampled (1.0 when unknown)."""
    if not train_config:
        return 1.0
    lam_range = train_config.get("lam_range")
    if lam_range is not None:
        return math.sqrt(float(lam_range[0]) * float(lam_range[1]))
    return float(train_config.get("lam", 1.0))


def _label_maps(labels: Sequence[ImageLike] | Mapping[str, ImageLike] | None) -> dict[str, Image]:
    """Named label maps (loaded when paths; names from file names or ``labels<i>``)."""
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


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    model: str | Path | None = None,
    similarity: str = "ncc",
    lam: float | None = None,
    refine: int | None = None,
    device: str | torch.device = "auto",
    moving_labels: Sequence[ImageLike] | Mapping[str, ImageLike] | None = None,
    fixed_labels: ImageLike | None = None,
    world_matrix: np.ndarray | None = None,
    affine: bool = True,
    affine_only: bool = False,
    affine_config: Any = None,
    config: AlignConfig | None = None,
    progress: ProgressCallback | None = None,
    metrics: bool = True,
    engine: str = "auto",
    defer_metrics: bool = False,
    symmetric: bool | None = None,
    passes: int | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and return a :class:`RegistrationResult`.

    Without ``model`` the field comes from instance optimisation (``config`` or defaults
    with ``similarity``/``lam``); with a checkpoint the network predicts it, refined by
    ``refine`` optimisation steps (None: a shipped model's own default, 0 for a checkpoint). An affine pre-alignment in world space runs
    first unless ``affine=False`` or an explicit ``world_matrix`` (fixed world -> moving world,
    RAS mm) is given; ``affine_only`` stops after it. Label maps are carried with nearest
    neighbour. ``metrics=True`` adds Jacobian statistics, similarity before/after and (with
    ``fixed_labels``) Dice to ``result.metrics``; ``metrics=False`` skips all of them and
    returns only the transforms, warped images and timings; ``defer_metrics`` leaves them to
    :meth:`RegistrationResult.finish_metrics` (:func:`write_outputs` computes them while the
    files are compressed). ``engine``: ``'auto'`` uses the
    shipped model for the scans' dimension when one ships (``voxreg models``), else instance
    optimisation; ``'instance'`` never uses a network; ``model`` may name a shipped model.
    ``symmetric``: the network's velocity averaged with the negated velocity of the swapped
    pair (:func:`symmetric_inference`; None: the shipped model's card decides). ``passes``:
    the network applied that many times, each pass to the moving scan warped by the passes
    before it, the fields composed (:func:`network_passes`; None: the shipped model's card
    decides, 1 for a checkpoint).
    """
    _check_options(lam, refine, affine, affine_only, moving_labels, fixed_labels, model, passes)
    total_start = time.perf_counter()
    configure_allocator()  # before the reading threads start (they then share the main heap)
    # the inputs are read side by side (decompression and casts release the GIL): 4 files of a
    # 1 mm pair with labels in ~0.6 instead of ~1.1 s; errors still surface in this order
    with ThreadPoolExecutor(max_workers=2) as pool:
        scans = [pool.submit(as_image, fixed), pool.submit(as_image, moving)]
        moving_label_maps = pool.submit(_label_maps, moving_labels)
        fixed_labels_read = pool.submit(as_image, fixed_labels, True) if fixed_labels is not None else None
        fixed_img, moving_img = scans[0].result(), scans[1].result()
        check_affine(fixed_img.affine, f"{fixed_img.path or 'fixed'}: header")
        check_affine(moving_img.affine, f"{moving_img.path or 'moving'}: header")
        if world_matrix is not None:
            check_affine(world_matrix, "world_matrix")
        _check_pair(fixed_img, moving_img)
        asked_model = model
        model, refine, engine_reason = choose_model(model, engine, fixed_img, moving_img, refine)
        if model is None and refine > 0 and not affine_only:
            raise VoxregError(
                f"--refine N refines a network's field, but no network runs ({engine_reason}): give --model "
                "(or a shipped model's name); instance optimisation runs its full schedule without it"
            )
        if model is None and passes is not None and passes > 1 and not affine_only:
            raise VoxregError(
                f"--passes N applies a network N times, but no network runs ({engine_reason}): give --model "
                "(or a shipped model's name)"
            )
        label_maps = moving_label_maps.result()
        fixed_label_img = fixed_labels_read.result() if fixed_labels_read is not None else None
    for labels in [*label_maps.values(), *([fixed_label_img] if fixed_label_img is not None else [])]:
        _check_pair(fixed_img, labels)
    torch_device = resolve_device(device)
    values: dict[str, Any] = {}
    if world_matrix is None and (affine or affine_only):
        world_matrix, values["affine"] = _affine_stage(fixed_img, moving_img, _affine_config(affine_config, similarity))
        release_memory_above(fixed_img.array.size)
    # the moving scan on the fixed grid after the affine stage: computed when something needs it
    # (instance optimisation, refinement, metrics, figures), not for a network alone
    moving_on_fixed = functools.cache(
        lambda: warp_image(moving_img, fixed_img, world_matrix=world_matrix, device=torch_device)
    )
    refine_lam = lam
    if config is None and lam is None and model is not None and refine > 0 and not affine_only:
        refine_lam = refinement_lambda(asked_model, engine, fixed_img.ndim, similarity)
    config = _align_config(config, similarity, refine_lam)
    start = time.perf_counter()
    if affine_only:
        engine, field = "affine", torch.zeros(1, fixed_img.ndim, *fixed_img.shape, device=torch_device)
        inverse: Callable[[], torch.Tensor] | None = None  # the identity: inverse_field's zero-field case
    else:
        symmetric_run = model is not None and symmetric_inference(asked_model, engine, fixed_img.ndim, symmetric)
        passes_run = 1 if model is None else network_passes(asked_model, engine, fixed_img.ndim, passes)
        pair = _Pair(fixed_img, moving_img, world_matrix, moving_on_fixed, torch_device, symmetric_run, passes_run)
        if symmetric_run:
            values["symmetric_inference"] = True
        if model is not None:
            values["network_passes"] = passes_run
        engine, field, inverse, notes = _estimate_field(pair, model, config, lam, refine, progress)
        values.update(notes)
        release_memory_above(fixed_img.array.size)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not math.isfinite(float(field.sum())):  # any NaN/Inf makes the sum so (a 10x cheaper check)
        raise VoxregError(f"registration failed: the {engine} field contains NaN/Inf (e.g. a model with NaN weights)")
    warped = warp_image(moving_img, fixed_img, field, world_matrix, device=torch_device)
    if not np.all(np.isfinite(warped.array)):
        raise VoxregError("registration failed: the warped image contains NaN/Inf")
    pipeline_seconds = time.perf_counter() - total_start  # affine + deformable + warp, no metrics
    warped_labels = {
        name: warp_image(lab, fixed_img, field, world_matrix, device=torch_device) for name, lab in label_maps.items()
    }
    values.update(
        {
            "engine": engine,
            "engine_reason": engine_reason,
            "device": str(torch_device),
            "registration_seconds": seconds,
            "pipeline_seconds": pipeline_seconds,
            "similarity_loss": config.similarity,
            "lambda": config.lam if model is None or refine > 0 else lam,
            "model": None if model is None else str(model),
            "fixed": str(fixed_img.path or ""),
            "moving": str(moving_img.path or ""),
        }
    )
    result = RegistrationResult(
        fixed_img,
        moving_on_fixed,
        warped,
        field.detach().cpu(),
        warped_labels,
        world_matrix,
        values,
        inverse_source=inverse,
    )  # the result's ``moving`` is made on first use
    values["total_seconds"] = time.perf_counter() - total_start
    if metrics:
        source = moving_img if "affine" in values else None  # raw similarity only after an affine stage

        def measure() -> dict[str, Any]:
            found = measure_registration(result, source, fixed_label_img, label_maps, torch_device)
            release_memory_above(fixed_img.array.size)
            return found | {"total_seconds": time.perf_counter() - total_start}

        result.pending_metrics = measure
        if not defer_metrics:
            result.finish_metrics()
    return result


def _check_options(
    lam: Any,
    refine: Any,
    affine: bool,
    affine_only: bool,
    moving_labels: Any,
    fixed_labels: Any,
    model: Any,
    passes: Any = None,
) -> None:
    """Validate the numeric and combined options of :func:`register` (one-line VoxregError)."""
    try:
        if lam is not None:
            check_number("--lambda", lam, low=0.0, low_inclusive=model is None)
        if refine is not None:
            check_int("--refine", refine, 0)
        if passes is not None:
            check_int("--passes", passes, 1, MAX_PASSES)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None
    if affine_only and not affine:
        raise VoxregError("--no-affine and --affine-only contradict each other: choose one")
    if fixed_labels is not None and not moving_labels:
        raise VoxregError("--fixed-labels needs --moving-labels (Dice compares the warped moving labels with them)")


def _affine_config(config: Any, similarity: str) -> Any:
    """The affine stage's config: given, or MI for a multi-modal (``similarity='mi'``) pair."""
    if config is None and similarity == "mi":
        from voxreg.registration.affine import AffineConfig

        return AffineConfig(similarity="mi")
    return config


def _affine_stage(fixed: Image, moving: Image, config: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Affine pre-alignment in world space; returns the matrix and its metrics."""
    from voxreg.registration.affine import affine_register

    result = affine_register(fixed, moving, config)
    return result.world_matrix, {
        "seconds": result.seconds,
        "init": result.init,
        "similarity_before": result.similarity_before,
        "similarity_after": result.similarity_after,
    }


def _align_config(config: AlignConfig | None, similarity: str, lam: float | None) -> AlignConfig:
    """The instance-optimisation config: given, or built from ``similarity``/``lam``."""
    if config is not None:
        return config
    try:
        return AlignConfig(similarity=similarity, lam=lam)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None


@dataclass(frozen=True)
class _Pair:
    """The pair a deformable engine works on: the scans, the affine stage's ``world_matrix``
    and the moving scan on the fixed grid (``moving_on_fixed()``, made on first use)."""

    fixed: Image
    moving: Image
    world_matrix: np.ndarray | None
    moving_on_fixed: Callable[[], Image]
    device: torch.device
    symmetric: bool = False  # the network averages both directions (symmetric_inference)
    passes: int = 1  # the network applied this many times (network_passes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised fixed and affine-aligned moving ``(1, 1, *S)`` for instance optimisation."""
        fixed = _to_tensor(io.normalize_intensity(self.fixed.array), self.device)
        return fixed, _to_tensor(io.normalize_intensity(self.moving_on_fixed().array), self.device)


def _estimate_field(
    pair: _Pair,
    model: str | Path | None,
    config: AlignConfig,
    lam: float | None,
    refine: int,
    progress: ProgressCallback | None,
) -> tuple[str, torch.Tensor, Callable[[], torch.Tensor] | None, dict[str, Any]]:
    """(engine name, field, a function giving its inverse or None, notes for metrics.json)
    from instance optimisation or the network (+ refinement); the network resamples the
    moving scan once, from its own grid to the model's, and a network alone gives its exact
    inverse (the negated velocity). Notes: ``optimisation_scales`` when the image was too
    large for the configured pyramid (:func:`voxreg.registration.instance.capped_scales`);
    ``network_precision`` when a network ran (:func:`voxreg.core.runtime.network_precision`)."""
    if model is None:
        found = align(*pair.tensors(), config, progress=progress)
        return "instance-optimisation", found.field, None, _scale_note(found, config)
    alone = refine <= 0
    field, inverse = _predict_with_model(
        model, pair.fixed, pair.moving, lam, pair.device, pair.world_matrix, alone, pair.symmetric, pair.passes
    )
    notes: dict[str, Any] = {"network_precision": _precision_used(model, pair.device)}
    if alone:
        return "network", field, inverse, notes
    fixed, moving = pair.tensors()
    schedule = config.refinement(refine)
    refined = align(fixed, moving, schedule, initial_field=field.to(fixed.device), progress=progress)
    return f"network+refine{refine}", refined.field, None, {**notes, **_scale_note(refined, schedule)}


def _precision_used(model_path: str | Path, device: torch.device) -> str:
    """The precision the (cached) network's convolutions ran in on its last forward pass
    (a voxreg network records it; :func:`voxreg.core.runtime.network_precision` otherwise)."""
    model, _ = loaded_checkpoint(model_path, device)
    return str(getattr(model, "last_precision", network_precision(device)))


def _scale_note(found: Any, config: AlignConfig) -> dict[str, Any]:
    """``{"optimisation_scales": [...]}`` when ``align`` optimised coarser levels than
    ``config`` asked for (a very large image), else ``{}``."""
    if not found.scales or tuple(found.scales) == tuple(config.scales):
        return {}
    return {"optimisation_scales": list(found.scales), "optimisation_scales_asked": list(config.scales)}


def apply_field(
    field_path: str | Path,
    image: ImageLike,
    nearest: bool | None = None,
    affine_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Image:
    """Apply a saved voxreg field (and optional ITK affine text) to ``image``; returns it
    on the field's (fixed) grid. ``nearest`` defaults to True for label maps
    (:func:`voxreg.io.looks_like_label_map`)."""
    field, fixed_affine = io.load_field(field_path)
    if isinstance(image, Image):
        loaded = image
    elif nearest is not None or io.stored_as_integer(image):
        loaded = io.load_image(image, label=nearest is not False)
    else:  # read once; integer-valued floats with few values (labels saved as float) are label maps
        loaded = io.load_image(image)
        if io.has_label_values(loaded.array):
            loaded = io.as_label_image(loaded)
    grid = Image(np.zeros(field.shape[1:], dtype=np.float32), fixed_affine)
    if loaded.ndim != grid.ndim:
        raise VoxregError(f"{loaded.path}: image is {loaded.ndim}D but the field {field_path} is {grid.ndim}D")
    world_matrix = io.read_itk_affine(affine_path) if affine_path is not None else None
    if world_matrix is not None:
        check_affine(world_matrix, str(affine_path))
    if not np.all(np.isfinite(field)):
        raise VoxregError(f"{field_path}: the field contains NaN/Inf")
    return warp_image(loaded, grid, torch.from_numpy(field)[None], world_matrix, nearest, resolve_device(device))
