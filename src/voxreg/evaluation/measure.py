"""Running one method on one loaded pair and measuring it: peak memory and the metric
columns of a result row (Dice/HD95 per structure, folding and SD log-Jacobian of the field,
global NCC/MI before and after, TRE before and after), with the unregistered pair's
measures computed once per pair."""

from __future__ import annotations

import json
import math
import os
import resource
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from voxreg import io, metrics
from voxreg.core.errors import VoxregError, one_line
from voxreg.core.runtime import heap_in_use_mb, release_memory
from voxreg.evaluation.methods import CPU_METHODS, METHODS
from voxreg.evaluation.types import (
    Before,
    EvaluationOptions,
    IntensityScale,
    MethodOutput,
    MethodRunner,
    PairData,
    Row,
)

_MEMORY_POLL_S = 0.02


class PeakMemory:
    """Peak memory (MB) used inside a ``with`` block: CUDA peak allocation on a CUDA device;
    on CPU with glibc, the peak of the heap in use (``mallinfo2``: bytes allocated by malloc,
    including its mmapped blocks; polled every 20 ms) minus the heap in use at entry; elsewhere
    the peak resident set (``/proc/self/status`` VmRSS, or ``resource.getrusage``) minus the
    resident set at entry, after freed memory is returned to the OS.

    The heap count sees a method's own allocations even when they reuse blocks an earlier
    method freed, so nothing needs to be handed back to the OS before a method: each method
    then runs as in ``register-batch``, on pages the process already holds, instead of paying
    their first-touch faults again (1 mm brain pairs: about 0.3 s per method on this 2-core VM)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sample: Callable[[], float | None] = heap_in_use_mb

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import gc

        gc.collect()
        if heap_in_use_mb() is None:
            release_memory()  # freed blocks kept by an earlier method must not hide this one's use
            self._sample = _resident_mb
        self._base = self._sample()
        self._peak = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self._base = _max_resident_mb()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(_MEMORY_POLL_S):
            self._peak = max(self._peak, self._sample() or 0.0)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._sample() or 0.0)
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
    return usage / 2**20 if os.uname().sysname == "Darwin" else usage / 1024.0


def nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    array = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(array)) if np.any(np.isfinite(array)) else float("nan")


def before(data: PairData, labels: Sequence[int]) -> Before:
    """The pair's reference measures (NCC/MI, Dice, TRE before registration), cached on
    ``data`` so that several methods of one pair compute them once."""
    if data.before is None:
        scale = IntensityScale(data.moving)
        fixed_n = io.normalize_intensity(data.fixed.array)
        row: Row = {}
        unregistered = io.resample_to(data.moving, data.fixed)
        row["ncc_before"], row["mi_before"] = metrics.global_similarity(fixed_n, scale(unregistered.array))
        if data.fixed_labels is not None and data.moving_labels is not None and labels:
            moving_labels = io.resample_to(data.moving_labels, data.fixed, nearest=True).array
            row["dice_before"] = nanmean(
                metrics.dice_per_label(data.fixed_labels.array, moving_labels, labels).values()
            )
        if data.fixed_points is not None:
            row["tre_before_mm"] = metrics.mean_distance(data.moving_points, data.fixed_points)
        data.before = Before(scale, fixed_n, row)
    return data.before


def measure(
    data: PairData, output: MethodOutput, labels: Sequence[int], names: Mapping[int, str] | None = None
) -> tuple[Row, list[Row]]:
    """The metric columns of one result row and its per-structure rows (without id/method);
    structure names from ``names`` (FreeSurfer names by default)."""
    from voxreg.io.labels import label_name

    reference = before(data, labels)
    row: Row = dict(reference.row)
    row["ncc_after"], row["mi_after"] = metrics.global_similarity(
        reference.fixed_normalized, reference.scale(output.warped.array)
    )
    jacobian = metrics.jacobian_stats(output.field)
    row["folding_percent"], row["sdlogj"] = jacobian["folding_percent"], jacobian["log_jacobian_std"]
    structures: list[Row] = []
    if data.fixed_labels is not None and output.warped_labels is not None and labels:
        scores = metrics.structure_scores(
            data.fixed_labels.array, output.warped_labels.array, labels, data.fixed.spacing
        )
        dice = np.array([s[0] for s in scores.values()], dtype=np.float64)
        row["dice_mean"] = nanmean(dice)
        row["dice_std"] = float(np.nanstd(dice)) if np.isfinite(dice).any() else math.nan
        row["hd95_mean_mm"] = nanmean([s[1] for s in scores.values()])
        structures = [
            {
                "label": label,
                "name": names.get(label, f"label {label}") if names else label_name(label),
                "dice": d,
                "hd95_mm": h,
            }
            for label, (d, h) in scores.items()
        ]
    if data.fixed_points is not None:
        row["tre_after_mm"] = metrics.mean_distance(data.moving_points, output.map_points(data.fixed_points))
    return row, structures


def run_one(
    data: PairData,
    method: str,
    options: EvaluationOptions,
    labels: Sequence[int],
    runner: MethodRunner | None = None,
    names: Mapping[int, str] | None = None,
) -> tuple[Row, list[Row], MethodOutput]:
    """Run ``method`` on a loaded pair and measure it: (result row, per-structure rows, output)."""
    runner = runner or METHODS[method]
    with PeakMemory("cpu" if method in CPU_METHODS else options.device) as memory:
        output = runner(data, options)
    row, structures = measure(data, output, labels, names)
    row.update(
        {
            "status": "ok",
            "error": "",
            "seconds": output.seconds,
            "peak_memory_mb": memory.peak_mb,
            "device": output.device,
            "threads": output.threads,
            "settings": json.dumps(output.settings, sort_keys=True, default=str),
        }
    )
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
