"""The one learning-rate schedule: cosine decay, shared by affine, instance optimisation and training."""

from __future__ import annotations

import math


def cosine_factor(progress: float, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``progress`` in [0, 1] (clipped): 1 at the
    start, ``floor`` at the end, half-cosine in between."""
    progress = min(max(float(progress), 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
