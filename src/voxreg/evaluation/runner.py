"""Evaluate registration methods over a CSV of pairs (``voxreg evaluate``), VoxelMorph
Table-1 style, side by side with ANTs SyN: the loop over pairs and methods, example
figures and the report.

The parts live in small modules: :mod:`~voxreg.evaluation.pairs` (pairs and landmark CSVs),
:mod:`~voxreg.evaluation.methods` and :mod:`~voxreg.evaluation.ants` (the engines, selectable
by name), :mod:`~voxreg.evaluation.measure` (running one method on one pair and measuring
it), :mod:`~voxreg.evaluation.store` (resumable CSVs). Measures (:mod:`voxreg.metrics`):

- Dice per label (labels in both label maps, minus ``exclude_labels``, optionally restricted to
  a :func:`voxreg.io.labels.preset`) and HD95 in mm (symmetric, surface voxels by face
  connectivity, as MONAI's ``compute_hausdorff_distance(percentile=95)``);
- % folding and SD of log-Jacobian of the deformable field (voxels of the fixed grid; the
  ANTs ``*Warp.nii.gz`` is converted from LPS mm), 0 for ``affine``;
- global NCC and MI (nats, 32 bins) on the fixed grid between the fixed scan and the moving scan
  mapped by the identity world transform (before) / warped (after); both images are scaled to
  [0, 1] by robust percentiles, the moving one with the same window before and after;
- TRE in mm: mean distance between the moving landmarks and the fixed landmarks mapped into the
  moving scan's world by the method's transform (before: the raw coordinates);
- seconds, peak memory (the heap in use on CPU with glibc, else the resident set;
  ``torch.cuda.max_memory_allocated`` on CUDA), device, threads and the method's exact settings
  (JSON).

Outputs in ``outdir``: ``results.csv`` (one row per pair and method; the last column
``dice_before`` is the mean Dice of the moving labels mapped by the identity world transform,
over the same labels), ``per_structure.csv``, ``examples/<id>_<method>.png`` and the report of
:mod:`voxreg.evaluation.report`. Both CSVs are rewritten to a temporary name and renamed after
every finished row, so an interrupted run leaves complete files; rerunning skips (id, method)
rows already ``ok`` and retries failed ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch

from voxreg import io
from voxreg.evaluation.ants import ANTS_MISSING, import_ants
from voxreg.evaluation.measure import describe_row, error_line, run_one
from voxreg.evaluation.methods import METHODS, align_config, resolve_methods
from voxreg.evaluation.pairs import Pair, PairData, load_pair, read_pairs, select_labels, structure_table
from voxreg.evaluation.store import RESULT_COLUMNS, STRUCTURE_COLUMNS, ResultStore
from voxreg.evaluation.types import EvaluationOptions, MethodOutput, Row
from voxreg.viz.evaluation import example_figure

__all__ = [
    "ANTS_MISSING",
    "METHODS",
    "RESULT_COLUMNS",
    "STRUCTURE_COLUMNS",
    "EvaluationResult",
    "describe_row",
    "evaluate",
    "resolve_methods",
]

PathLike = str | os.PathLike
ProgressCallback = Callable[[int, int, Row], None]


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


def evaluate(
    pairs_csv: PathLike,
    outdir: PathLike,
    methods: Sequence[str] | str | None = None,
    *,
    model: PathLike | None = None,
    refine: int | None = None,
    lam: float | None = None,
    similarity: str = "ncc",
    device: str | torch.device = "auto",
    passes: int | None = None,
    structures: str = "all",
    exclude_labels: Iterable[int] = (0,),
    ants_threads: int | None = None,
    examples: int = 2,
    iterations: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Run ``methods`` on every pair of ``pairs_csv`` and write results.csv, per_structure.csv
    and example PNGs into ``outdir`` (see the module docstring). A failing (pair, method) is
    recorded with status ``failed`` and the run goes on; (pair, method) rows already ``ok`` in
    ``outdir`` are skipped. ``progress(done, total, row)`` is called after each (pair, method)."""
    from voxreg.core.runtime import resolve_device

    pairs = read_pairs(pairs_csv)
    names = resolve_methods(methods, model)
    if "ants-syn" in names:
        import_ants()
    structure_table(structures)  # an unknown preset or table fails before any work
    options = EvaluationOptions(
        model=model,
        refine=None if refine is None else int(refine),
        passes=None if passes is None else int(passes),
        lam=lam,
        similarity=similarity,
        device=resolve_device(device),
        ants_threads=ants_threads,
        iterations=tuple(int(i) for i in iterations) if iterations else None,
    )
    align_config(options)  # bad --similarity / --lambda / --iterations fail before any work
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


def _evaluate_pair(
    pair: Pair,
    methods: Sequence[str],
    options: EvaluationOptions,
    structures: str,
    exclude: Sequence[int],
    example: bool,
    store: ResultStore,
    result: EvaluationResult,
) -> Iterable[Row]:
    """Load one pair and run each method on it, storing every row as soon as it is done."""
    try:
        data = load_pair(pair)
        labels = (
            select_labels(data.fixed_labels.array, data.moving_labels.array, structures, exclude)
            if data.fixed_labels is not None
            else []
        )
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
    return {
        "id": pair.id,
        "fixed": str(pair.fixed),
        "moving": str(pair.moving),
        "method": method,
        "status": "failed",
        "error": error_line(exc),
    }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "pair"


def _example(output: MethodOutput, data: PairData, pair: Pair, method: str, outdir: Path, row: Row) -> Path:
    title = f"{pair.id} {method}"
    if row.get("dice_mean") is not None:
        title += f"  Dice {row['dice_mean']:.3f}"
    title += f"  NCC {row['ncc_before']:.3f} -> {row['ncc_after']:.3f}"
    path = outdir / "examples" / f"{_safe_name(pair.id)}_{_safe_name(method)}.png"
    return example_figure(data.fixed, output.warped, path, title)


def _write_report(result: EvaluationResult) -> None:
    """Write the report of :mod:`voxreg.evaluation.report` from the finished CSVs."""
    from voxreg.evaluation.report import write_report

    try:
        result.report = {k: Path(v) for k, v in (write_report(result.outdir) or {}).items()}
    except Exception as exc:  # the CSVs are complete; a report problem must not lose them
        result.warnings.append(f"report: {error_line(exc)}")
