"""Image similarity measures for reports: global NCC, local NCC, MI (nats) and MSE between
images on one grid (the maths are :mod:`voxreg.losses`; here they give plain floats)."""

from __future__ import annotations

import torch
from torch import Tensor

from voxreg import losses
from voxreg.losses.similarity import FixedLocalNCC
from voxreg.metrics._arrays import ArrayLike, as_image

#: voxels (a fixed-seed random subset) the reported MI is estimated from: at 2^18 its value
#: moves by under 0.002 nats from the 2^20 estimate on 1 mm brain pairs, at a quarter of the cost
REPORT_MI_VOXELS = 1 << 18


def similarities(
    fixed: ArrayLike, other: ArrayLike, window: int = 9, bins: int = 32, max_voxels: int | None = REPORT_MI_VOXELS
) -> dict[str, float]:
    """Global NCC, local NCC (squared, ``window``), MI (nats) and MSE between two images
    on one grid (MI expects intensities in [0, 1])."""
    fixed, other = as_image(fixed), as_image(other)
    with torch.no_grad():
        return _similarity_values(fixed, other, window, bins, max_voxels)


def _similarity_values(
    fixed: Tensor,
    other: Tensor,
    window: int,
    bins: int,
    max_voxels: int | None,
    local: FixedLocalNCC | None = None,
) -> dict[str, float]:
    """The four measures of ``other`` against ``fixed``; ``local`` (the fixed image's local
    NCC moments, computed once) gives the same local NCC as ``losses.local_ncc``."""
    return {
        "ncc": float(losses.global_ncc(fixed, other)),
        "local_ncc": float(local(other) if local is not None else losses.local_ncc(fixed, other, window)),
        "mi": float(losses.mutual_information(fixed, other, bins, max_voxels=max_voxels)),
        "mse": float(losses.mse(fixed, other)),
    }


def similarity_report(
    fixed: ArrayLike,
    moving: ArrayLike,
    warped: ArrayLike,
    window: int = 9,
    bins: int = 32,
    max_voxels: int | None = REPORT_MI_VOXELS,
    raw: ArrayLike | None = None,
) -> dict[str, float]:
    """Similarity of fixed vs moving (``*_before``), fixed vs warped (``*_after``) and, when
    ``raw`` is given, fixed vs the raw moving scan before any alignment (``*_raw``).

    Keys: ``ncc`` (global Pearson), ``local_ncc`` (squared, ``window``), ``mi`` (nats,
    ``bins``, on at most ``max_voxels`` voxels with a fixed seed) and ``mse``, each with
    the suffix ``_before`` / ``_after`` (/ ``_raw``). The images must already be on the fixed
    grid; MI expects intensities in [0, 1]. The fixed image's local NCC moments are
    computed once for all of them.
    """
    f, m, w = as_image(fixed), as_image(moving), as_image(warped)
    others = {"before": m, "after": w, **({"raw": as_image(raw)} if raw is not None else {})}
    if any(tuple(image.shape) != tuple(f.shape) for image in others.values()):
        shapes = ", ".join(str(tuple(image.shape)) for image in (f, *others.values()))
        raise ValueError(f"fixed, moving and warped (and raw) differ in shape: {shapes}")
    report: dict[str, float] = {}
    with torch.no_grad():
        local = FixedLocalNCC(f, window)
        for suffix, image in others.items():
            values = _similarity_values(f, image, window, bins, max_voxels, local)
            report.update({f"{key}_{suffix}": value for key, value in values.items()})
    return report


def global_similarity(fixed: ArrayLike, other: ArrayLike) -> tuple[float, float]:
    """(global NCC, MI in nats) of two [0, 1] images on one grid."""
    values = similarities(fixed, other)
    return values["ncc"], values["mi"]
