"""Choose the regularisation weight of a lambda-conditional network without retraining.

:func:`tune_lambda` runs the network at a log-spaced grid of lambda values over the
validation pairs of a :class:`~voxreg.train.TrainingSet` (scans with label maps on one
grid, pairs as in training validation) and records, per lambda, the mean Dice of the warped
labels and the regularity of the field (% voxels with det J <= 0, SD of log J). The
recommended lambda has the highest mean Dice among those whose mean folding stays within
``max_folding`` percent. Outputs: ``lambda_curve.csv`` and ``lambda_curve.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.io.tables import write_table
from voxreg.nn import VoxelMorph, load_checkpoint
from voxreg.training.trainer import TrainingSet
from voxreg.viz.evaluation import lambda_curve

__all__ = ["LambdaPoint", "TuneResult", "lambda_grid", "tune_lambda", "recommend"]

CSV_COLUMNS = ("lambda", "dice_mean", "dice_std", "folding_percent", "log_jacobian_std", "pairs")


@dataclass
class LambdaPoint:
    """Validation summary at one lambda (means over pairs; ``dice_std`` across pairs)."""

    lam: float
    dice_mean: float
    dice_std: float
    folding_percent: float
    log_jacobian_std: float
    pairs: int


@dataclass
class TuneResult:
    """What :func:`tune_lambda` returns: the curve, the recommended lambda and file paths."""

    points: list[LambdaPoint]
    recommended: float
    reason: str
    csv: Path
    plot: Path


def lambda_grid(low: float, high: float, num: int = 9) -> list[float]:
    """``num`` log-spaced values from ``low`` to ``high`` (both included)."""
    if not (0 < low < high) or num < 2:
        raise VoxregError(f"need 0 < low < high and num >= 2, got low={low}, high={high}, num={num}")
    return [float(v) for v in np.geomspace(low, high, num)]


def recommend(points: Sequence[LambdaPoint], max_folding: float) -> tuple[float, str]:
    """Lambda with the best mean Dice among those with mean folding <= ``max_folding`` %
    (the least folding one when none qualifies), and a one-line reason."""
    ok = [p for p in points if p.folding_percent <= max_folding and math.isfinite(p.dice_mean)]
    if ok:
        best = max(ok, key=lambda p: p.dice_mean)
        return best.lam, (
            f"highest mean Dice ({best.dice_mean:.3f}) with folding {best.folding_percent:.3f} % <= {max_folding} %"
        )
    best = min(points, key=lambda p: p.folding_percent)
    return best.lam, f"no lambda keeps folding <= {max_folding} %; least folding ({best.folding_percent:.3f} %)"


def _pair_scores(
    model: VoxelMorph, data: TrainingSet, lam: float, device: torch.device, exclude: Sequence[int]
) -> list[tuple[float, float, float]]:
    """(mean Dice, folding %, SD log J) for each labelled validation pair at ``lam``."""
    scores = []
    for m, f in data.validation_pairs():
        if not bool(data.has_labels[m] & data.has_labels[f]):
            continue
        moving, fixed = data.images[m : m + 1].to(device), data.images[f : f + 1].to(device)
        with torch.inference_mode():
            field = model.predict_field(moving, fixed, lam)
            warped = spatial.warp(data.labels[m : m + 1].to(device).float(), field, mode="nearest")
        fixed_labels = data.labels[f, 0].numpy()
        warped_labels = warped[0, 0].cpu().numpy().astype(np.int64)
        present = (set(np.unique(fixed_labels)) & set(np.unique(warped_labels))) - set(exclude)
        dice = metrics.dice_per_label(fixed_labels, warped_labels, sorted(present))
        stats = metrics.jacobian_stats(field)
        scores.append((float(np.nanmean(list(dice.values()))), stats["folding_percent"], stats["log_jacobian_std"]))
    return scores


def _write_csv(path: Path, points: Sequence[LambdaPoint]) -> None:
    """``lambda_curve.csv``: one row per lambda, floats with 6 significant digits."""
    rows = [
        {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in zip(CSV_COLUMNS, asdict(p).values())} for p in points
    ]
    write_table(path, CSV_COLUMNS, rows)


def _plot(path: Path, points: Sequence[LambdaPoint], recommended: float, max_folding: float, title: str) -> None:
    """Dice (mean +- std over pairs) and % folding against lambda on a log axis."""
    lambda_curve(
        path,
        [p.lam for p in points],
        [p.dice_mean for p in points],
        [p.dice_std for p in points],
        [p.folding_percent for p in points],
        recommended,
        max_folding,
        title,
    )


def tune_lambda(
    model_path: str | os.PathLike[str],
    data: TrainingSet,
    output_dir: str | os.PathLike[str],
    lambdas: Sequence[float] | None = None,
    num: int = 9,
    max_folding: float = 0.5,
    device: str | torch.device = "auto",
    exclude: Sequence[int] = (0,),
    progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Sweep lambda for a lambda-conditional checkpoint over ``data``'s validation pairs.

    ``lambdas`` defaults to ``num`` log-spaced values over the range the model was trained
    on. Labels in ``exclude`` are not scored. Writes ``lambda_curve.csv`` and
    ``lambda_curve.png`` to ``output_dir``.
    """
    from voxreg.core.runtime import resolve_device

    if lambdas is not None and not all(math.isfinite(v) and v > 0 for v in lambdas):
        raise VoxregError(f"lambdas must be finite numbers > 0, got {list(lambdas)}")
    if not (math.isfinite(max_folding) and max_folding >= 0):
        raise VoxregError(f"max_folding must be a finite percentage >= 0, got {max_folding}")
    torch_device = resolve_device(device)
    model, extra = load_checkpoint(model_path, torch_device)
    if not model.config.lambda_conditional:
        raise VoxregError(
            f"{model_path}: not a lambda-conditional model; tune-lambda needs one trained with --lambda-range"
        )
    if data.labels is None or len(data.validation_pairs()) == 0:
        raise VoxregError("tune-lambda needs validation scans with label maps (scan,labels CSV rows)")
    if data.ndim != model.config.ndim:
        raise VoxregError(f"{model_path}: a {model.config.ndim}D model, but the scans are {data.ndim}D")
    lam_range = (extra.get("train_config") or {}).get("lam_range")
    values = list(lambdas) if lambdas else lambda_grid(*(lam_range or (0.01, 10.0)), num=num)
    out = io.ensure_output_dir(output_dir)
    model.eval()
    points = []
    for i, lam in enumerate(values):
        scores = np.array(_pair_scores(model, data, float(lam), torch_device, exclude))
        if scores.size == 0:
            raise VoxregError("no validation pair has label maps on both scans")
        points.append(
            LambdaPoint(
                float(lam),
                float(scores[:, 0].mean()),
                float(scores[:, 0].std()),
                float(scores[:, 1].mean()),
                float(scores[:, 2].mean()),
                len(scores),
            )
        )
        if progress is not None:
            progress(i + 1, len(values))
    recommended, reason = recommend(points, max_folding)
    csv_path, plot_path = out / "lambda_curve.csv", out / "lambda_curve.png"
    _write_csv(csv_path, points)
    range_text = f" (trained on λ in [{lam_range[0]:g}, {lam_range[1]:g}])" if lam_range else ""
    _plot(
        plot_path,
        points,
        recommended,
        max_folding,
        f"{Path(model_path).name}{range_text}: {points[0].pairs} validation pairs",
    )
    return TuneResult(points, recommended, reason, csv_path, plot_path)
