"""Evaluation: pair lists, methods (voxreg engines, ANTs SyN), result store, reports, lambda tuning."""
