"""The registration methods ``voxreg evaluate`` compares, selectable by name (:data:`METHODS`):
``affine`` (voxreg affine stage only), ``instance`` (affine + instance optimisation),
``network`` / ``network-refine`` (affine + a checkpoint, + N refinement steps), all through
:func:`voxreg.registration.pipeline.register`, and ``ants-syn`` (:mod:`voxreg.evaluation.ants`).
Every method returns one :class:`~voxreg.evaluation.types.MethodOutput`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg.cohort.points import map_points as points_through
from voxreg.core.errors import VoxregError
from voxreg.evaluation.ants import run_ants_syn
from voxreg.evaluation.types import EvaluationOptions, MethodOutput, MethodRunner, PairData

PathLike = str | os.PathLike
DEFAULT_METHODS = ("affine", "ants-syn", "instance")
MODEL_METHODS = ("network", "network-refine")
CPU_METHODS = frozenset({"ants-syn"})  # run on CPU whatever --device says
CHECKPOINT_REFINE = 50  # network-refine steps after a checkpoint file when --refine is not given


def map_points(
    points: np.ndarray, fixed_affine: np.ndarray, field: np.ndarray, world_matrix: np.ndarray | None = None
) -> np.ndarray:
    """Map fixed world points ``(n, 3)`` (RAS mm) to moving world points through voxreg's
    composite, the field first, then the world matrix: :func:`voxreg.cohort.points.map_points`,
    the function ``voxreg transform-points`` uses (ANTs' rule at the grid's edges)."""
    return points_through(points, fixed_affine, field, world_matrix)


def align_config(options: EvaluationOptions) -> Any:
    """AlignConfig for instance optimisation / refinement (``iterations`` per pyramid level,
    scales 2^(k-1) .. 1); a bad value is a VoxregError."""
    from voxreg.registration.instance import AlignConfig

    kwargs: dict[str, Any] = {"similarity": options.similarity, "lam": options.lam}
    if options.iterations:
        kwargs["iterations"] = tuple(options.iterations)
        kwargs["scales"] = tuple(2**i for i in reversed(range(len(options.iterations))))
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
    settings = {
        "affine": "voxreg.affine defaults",
        "seconds": "api.register pipeline_seconds (input normalisation, affine, deformable, "
        "warping the moving scan; not the metrics)",
        "torch": torch.__version__,
        **_jsonable_kwargs(kwargs),
        "engine": result.metrics["engine"],
        "engine_reason": result.metrics["engine_reason"],
        "model": result.metrics["model"],
        "network_passes": result.metrics.get("network_passes"),
    }
    return MethodOutput(
        warped=result.warped,
        field=field,
        seconds=float(result.metrics["pipeline_seconds"]),
        map_points=lambda points: map_points(points, fixed_affine, field, world_matrix),
        warped_labels=result.warped_labels.get("labels"),
        device=_device_name(options.device),
        threads=torch.get_num_threads(),
        settings=settings,
    )


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


def run_default(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """What ``voxreg register FIXED MOVING`` does with no options: the shipped model for the
    scans' dimension and its default refinement when one ships, else instance optimisation."""
    return _run_voxreg(data, options)


def run_instance(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + instance optimisation (``--similarity``, ``--lambda``, ``--iterations``)."""
    return _run_voxreg(data, options, engine="instance", config=align_config(options))


def run_network(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + the model ``options.model`` (``options.passes`` passes; no refinement)."""
    model = _require_model(options, data.fixed.ndim)
    return _run_voxreg(
        data, options, model=model, lam=options.lam, refine=0, passes=options.passes, config=align_config(options)
    )


def run_network_refine(data: PairData, options: EvaluationOptions) -> MethodOutput:
    """Affine stage + the network + ``options.refine`` instance-optimisation steps (None: a
    shipped model's own default, :data:`CHECKPOINT_REFINE` after a checkpoint file)."""
    from voxreg.registration.pipeline import default_refinement

    model = _require_model(options, data.fixed.ndim)
    refine = options.refine
    if refine is None:
        refine = default_refinement(model, "network", data.fixed.ndim) or CHECKPOINT_REFINE
    return _run_voxreg(
        data, options, model=model, lam=options.lam, refine=refine, passes=options.passes, config=align_config(options)
    )


def _require_model(options: EvaluationOptions, ndim: int) -> str | Path:
    """``--model``, else the shipped model ``voxreg register --engine network`` runs for
    ``ndim``-D scans."""
    if options.model is not None:
        return options.model
    from voxreg.nn.shipped import default_model

    shipped = default_model(ndim, engine="network")
    if shipped is None:
        raise VoxregError(f"methods network and network-refine: no model ships for {ndim}D scans; give --model")
    return shipped.name


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


METHODS: dict[str, MethodRunner] = {
    "affine": run_affine,
    "default": run_default,
    "instance": run_instance,
    "network": run_network,
    "network-refine": run_network_refine,
    "ants-syn": run_ants_syn,
}


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
    if model is not None:
        from voxreg.registration.pipeline import resolve_model

        checkpoint = resolve_model(model, "network", 3)
        if checkpoint is None or not Path(checkpoint).is_file():
            raise VoxregError(f"{model}: model checkpoint not found")
    return names
