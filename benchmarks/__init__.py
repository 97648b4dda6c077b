"""voxreg's benchmark harness: ``python -m benchmarks <suite> [options]``.

- ``python -m benchmarks --list``: the suites and what each measures;
- ``python -m benchmarks <suite> [--quick] [--out FILE] [--docs]``: run one suite; results go
  to ``benchmarks/results/<suite>.json`` (``--quick`` runs go to /tmp unless ``--out``);
- ``python -m benchmarks docs``: rewrite the generated tables of docs/benchmarks.md from the
  JSON files (only the text between ``<!-- generated:<suite> -->`` markers).

Shared pieces: :mod:`benchmarks.pairs` (the data's registration pairs), :mod:`benchmarks.timing`
(fresh-process wall time and peak memory), :mod:`benchmarks.results` (JSON with machine info),
:mod:`benchmarks.docs` (the docs generator). Kept apart: ``gpu_check.sh`` / ``gpu_check.py``
(the prepared GPU check), ``learning_curve.py`` (training runs) and ``multiphase_ct.py`` (makes
the simulated CT set the ``evaluation`` suite reads).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUITES: dict[str, str] = {
    "speed": "benchmarks.suites.speed",
    "evaluation": "benchmarks.suites.evaluation",
    "batch": "benchmarks.suites.batch",
    "large-scan": "benchmarks.suites.large_scan",
    "affine": "benchmarks.suites.affine",
    "refine-schedule": "benchmarks.suites.refine_schedule",
    "synth-probe": "benchmarks.suites.synth_probe",
}


def load_suite(name: str) -> ModuleType:
    """The module of suite ``name`` (KeyError for an unknown name)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])


def list_suites() -> dict[str, str]:
    """Suite name -> its one-line summary."""
    return {name: load_suite(name).SUMMARY for name in SUITES}
