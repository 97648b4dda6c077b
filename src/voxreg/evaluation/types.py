"""Types shared by the evaluation modules: the options of one evaluation, what a method
returns (:class:`MethodOutput`) and the signature every method runner has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from voxreg.core.image import Image

if TYPE_CHECKING:
    from voxreg.evaluation.pairs import PairData

Row = dict[str, Any]


@dataclass
class EvaluationOptions:
    """Settings shared by the methods of one evaluation."""

    model: str | Path | None = None  # a checkpoint file or a shipped model's name
    refine: int | None = None  # None: the shipped model's own, 50 after a checkpoint file
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


MethodRunner = Callable[["PairData", EvaluationOptions], MethodOutput]
