"""Many scans at once: point mapping, quality flags and the cohort report, template building.

Built on :mod:`voxreg.registration`; below :mod:`voxreg.evaluation` and :mod:`voxreg.cli`.
Submodules are imported where used (no heavy imports here).
"""
