"""Types shared by the evaluation modules: a pair (:class:`Pair`) and a loaded pair
(:class:`PairData`, with its unregistered measures :class:`Before`), the options of one
evaluation, what a method returns (:class:`MethodOutput`) and the signature every method
runner has. Imports no other evaluation module, so the evaluation modules stay acyclic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import io
from voxreg.core.image import Image
from voxreg.registration.batch import BatchPair

Row = dict[str, Any]


@dataclass(frozen=True)
class Pair(BatchPair):
    """One row of the pairs CSV, with absolute paths (None when a column is empty): the
    fields of :class:`~voxreg.registration.batch.BatchPair` and the landmark files."""

    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None


class IntensityScale:
    """[0, 1] scaling of the moving scan by its own robust range, the same before and after."""

    def __init__(self, moving: Image) -> None:
        self.window = io.robust_range(np.asarray(moving.array, np.float32), 0.5, 99.5)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        low, high = self.window
        if not high > low:
            return np.zeros_like(array, dtype=np.float32)
        return io.normalize_intensity(array, window=(low, high))


@dataclass
class Before:
    """What every method of a pair is compared against: the intensity scaling, the
    normalised fixed scan and the measures of the unregistered pair (identity mapping)."""

    scale: IntensityScale
    fixed_normalized: np.ndarray
    row: Row


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
    before: Before | None = None  # the unregistered pair's measures, computed once


@dataclass
class EvaluationOptions:
    """Settings shared by the methods of one evaluation."""

    model: str | Path | None = None  # a checkpoint file or a shipped model's name
    refine: int | None = None  # None: the shipped model's own, 50 after a checkpoint file
    passes: int | None = None  # network passes (a cascade); None: the shipped model's own, 1 after a checkpoint
    lam: float | None = None
    similarity: str = "ncc"
    device: torch.device = dataclass_field(default_factory=lambda: torch.device("cpu"))
    ants_threads: int | None = None
    iterations: tuple[int, ...] | None = None


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
