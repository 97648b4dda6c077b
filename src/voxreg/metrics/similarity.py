"""Image similarity measures for reports: global NCC, local NCC, MI (nats) and MSE between
images on one grid (the maths are :mod:`voxreg.losses`; here they give plain floats)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from voxreg import losses
from voxreg.core.spatial import spatial_ndim
from voxreg.losses.similarity import box_sum, clip_window, inverse_box_counts, window_sizes
from voxreg.metrics._arrays import ArrayLike, as_image

#: voxels (a fixed-seed random subset) the reported MI is estimated from: at 2^18 its value
#: moves by under 0.002 nats from the 2^20 estimate on 1 mm brain pairs, at a quarter of the cost
REPORT_MI_VOXELS = 1 << 18
#: voxels per slab of the reported local NCC (:func:`slab_measures`): its memory no longer
#: grows with the image (a 0.7 mm 512x512x300 CT held ~27 float32 volumes for it at once), and
#: a slab's channels stay closer to the CPU caches through the box sums' passes (three images
#: of a 1 mm brain's grid on 2 cores: 1.0-1.35 s with 2^22 voxels, 0.56 s with 2^20, 0.67 s with
#: 2^19, where the halo rows start to cost more than the caches save)
REPORT_SLAB_VOXELS = 1 << 20


def similarities(
    fixed: ArrayLike, other: ArrayLike, window: int = 9, bins: int = 32, max_voxels: int | None = REPORT_MI_VOXELS
) -> dict[str, float]:
    """Global NCC, local NCC (squared, ``window``), MI (nats) and MSE between two images
    on one grid (MI expects intensities in [0, 1])."""
    fixed, other = as_image(fixed), as_image(other)
    with torch.no_grad():
        return _similarity_values(fixed, other, window, bins, max_voxels)


def _similarity_values(
    fixed: Tensor, other: Tensor, window: int, bins: int, max_voxels: int | None
) -> dict[str, float]:
    """The four measures of ``other`` against ``fixed`` (NCC, local NCC and MSE in one slab
    pass: :func:`slab_measures`)."""
    measures = slab_measures(fixed, {"other": other}, window)["other"]
    return measures | {"mi": float(losses.mutual_information(fixed, other, bins, max_voxels=max_voxels))}


def _moments(image: Tensor) -> tuple[Tensor, Tensor]:
    """Global mean and std (0 replaced by 1) of a batch-1 single-channel image, as
    ``losses.local_ncc`` standardises it."""
    mean = image.mean()
    std = image.std(correction=0)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def slab_measures(
    fixed: Tensor,
    others: dict[str, Tensor],
    window: int = 9,
    eps: float = 1e-5,
    slab_voxels: int = REPORT_SLAB_VOXELS,
    skip_flat: bool = True,
) -> dict[str, dict[str, float]]:
    """``local_ncc`` (squared, mean over every voxel, as ``losses.local_ncc(fixed, other,
    window)``), ``ncc`` (global Pearson, as ``losses.global_ncc``) and ``mse`` (as
    ``losses.mse``) of each of ``others`` against ``fixed`` (batch-1 single-channel images on
    one grid), in one pass slab by slab along the first spatial axis with a halo of the
    window's radius, so that memory stays at a few slabs whatever the image's size. The fixed
    image's moments are computed once per slab for all of ``others``; the global NCC comes from
    float64 sums of the standardised images and their products, and the MSE from float64 sums
    of each slab's squared differences: the same values as the whole-image computations up to
    float32 rounding, without their full-size temporaries.

    ``skip_flat`` (False: every window box summed, for comparison): the windows where every image is constant (its first voxel's value: the
    zero background of a skull-stripped brain: 44 % of a 1 mm Mindboggle grid's voxels) are not box
    summed; their local NCC, the same float for every window clipped alike by the image's
    border, comes from a constant image of (2r + 2) voxels per axis (:class:`_FlatWindows`):
    the same value to float64 summation order, at about half the cost."""
    shape = tuple(int(n) for n in fixed.shape[2:])
    sizes = clip_window(window_sizes(window, spatial_ndim(fixed)), shape)
    plane = max(1, int(fixed[0, 0, 0].numel()))
    step = max(1, slab_voxels // plane)
    fixed_moments = _moments(fixed)
    stats = {name: _moments(image) for name, image in others.items()}
    flat = _FlatWindows(fixed, others, sizes, eps, fixed_moments, stats) if skip_flat else None
    local = dict.fromkeys(others, 0.0)
    fixed_sums = torch.zeros(2, dtype=torch.float64)  # sum of a, a*a (a: the standardised fixed image)
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in others}  # b, b*b, a*b, (fixed - other)^2
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        rows = slice(start, stop)
        a = _standardised(fixed, (rows,), fixed_moments)
        fixed_sums += _row_sums(torch.cat([a, a * a]), slice(None))
        for name, image in others.items():
            b = _standardised(image, (rows,), stats[name])
            difference = fixed[:, :, rows] - image[:, :, rows]
            sums[name] += torch.cat(
                [_row_sums(torch.cat([b, b * b, a * b]), slice(None)), difference.square_().sum().double().reshape(1)]
            )
        boxes = flat.boxes(start, stop) if flat is not None else _every_window(start, stop, shape, sizes)
        if boxes is not None:
            need, compute = boxes
            for name, ncc in _local_ncc_maps(fixed, others, sizes, eps, compute, fixed_moments, stats).items():
                kept = tuple(slice(n.start - c.start, n.stop - c.start) for n, c in zip(need, compute))
                local[name] += float(ncc[(0, *kept)].double().square().sum())
        for name in others if flat is not None else ():
            local[name] += flat.square_sum(name, start, stop, None if boxes is None else boxes[0])
    voxels = float(fixed.numel())
    return {
        name: {"local_ncc": local[name] / voxels, **_pearson_and_mse(fixed_sums, sums[name], voxels)} for name in others
    }


def _every_window(
    start: int, stop: int, shape: Sequence[int], sizes: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(need, compute) boxes of :func:`slab_measures` that box-sum every window of the rows
    ``start:stop`` (``skip_flat=False``): the rows, and the rows with a halo of the window's radius."""
    radius, rest = sizes[0] // 2, tuple(slice(0, int(n)) for n in shape[1:])
    return (slice(start, stop), *rest), (slice(max(0, start - radius), min(int(shape[0]), stop + radius)), *rest)


def _standardised(image: Tensor, box: tuple[slice, ...], moments: tuple[Tensor, Tensor]) -> Tensor:
    """``(image[box] - mean) / std`` for a batch-1 single-channel image."""
    mean, std = moments
    return (image[(slice(None), slice(None), *box)] - mean) / std


def _local_ncc_maps(
    fixed: Tensor,
    others: dict[str, Tensor],
    sizes: Sequence[int],
    eps: float,
    box: tuple[slice, ...],
    fixed_moments: tuple[Tensor, Tensor],
    stats: dict[str, tuple[Tensor, Tensor]],
) -> dict[str, Tensor]:
    """Local NCC ``(1, *box shape)`` of each of ``others`` against ``fixed`` over ``box`` (the
    windows of the voxels further than the window's radius inside the box, or at the image's
    border, are whole: their values are those of the whole image)."""
    shape = tuple(int(n) for n in fixed.shape[2:])
    inv_count = inverse_box_counts(shape, sizes, fixed.device, fixed.dtype, box=box)
    a = _standardised(fixed, box, fixed_moments)
    mu_a, aa = box_sum(torch.cat([a, a * a]), sizes).mul_(inv_count).unbind(0)
    var_a_eps = (aa - mu_a * mu_a).clamp_min_(0.0).add_(eps)
    maps = {}
    for name, image in others.items():
        b = _standardised(image, box, stats[name])
        mu_b, bb, ab = box_sum(torch.cat([b, b * b, a * b]), sizes).mul_(inv_count).unbind(0)
        cov = ab.sub_(mu_a * mu_b).add_(eps)
        var_b_eps = bb.sub_(mu_b * mu_b).clamp_min_(0.0).add_(eps)
        maps[name] = cov.mul_(torch.rsqrt(var_a_eps * var_b_eps))
    return maps


class _FlatWindows:
    """The windows of a report's local NCC where the fixed image and every other one hold
    their first voxel's value throughout. Such a window's box sums are the same adds of the
    same floats wherever the image's border clips the window alike, so its local NCC is that
    of a constant image of ``min(n, 2r + 2)`` voxels per axis (``r``: the window's radius) at
    the voxel clipped the same way (:meth:`_pattern`)."""

    def __init__(
        self,
        fixed: Tensor,
        others: dict[str, Tensor],
        sizes: Sequence[int],
        eps: float,
        fixed_moments: tuple[Tensor, Tensor],
        stats: dict[str, tuple[Tensor, Tensor]],
    ) -> None:
        self.shape = tuple(int(n) for n in fixed.shape[2:])
        self.radii = [int(size) // 2 for size in sizes]
        corner = (0, 0) + (0,) * len(self.shape)
        varying = fixed[0, 0] != fixed[corner]
        for image in others.values():
            varying |= image[0, 0] != image[corner]
        self.varying = varying
        found = torch.nonzero(varying.flatten(1).any(dim=1)).flatten()
        self.rows = None if found.numel() == 0 else (int(found[0]), int(found[-1]))
        self.patterns = [self._pattern(n, r) for n, r in zip(self.shape, self.radii)]
        small = tuple(int(p.max()) + 1 for p in self.patterns)
        constant = torch.full((1, 1, *small), float(fixed[corner]), dtype=fixed.dtype)
        images = {
            name: torch.full((1, 1, *small), float(image[corner]), dtype=image.dtype) for name, image in others.items()
        }
        box = tuple(slice(0, n) for n in small)
        maps = _local_ncc_maps(constant, images, sizes, eps, box, fixed_moments, stats)
        self.squares = {name: ncc[0].double().square() for name, ncc in maps.items()}
        self._small = small

    @staticmethod
    def _pattern(n: int, radius: int) -> Tensor:
        """The index in a constant image of ``min(n, 2 radius + 2)`` voxels whose window the
        image's border clips as it clips voxel ``i``'s, for each ``i`` of an axis of ``n``."""
        index = torch.arange(n)
        if n <= 2 * radius + 2:
            return index
        small = 2 * radius + 2
        return torch.where(index < radius, index, torch.where(n - 1 - index < radius, small - n + index, radius))

    def boxes(self, start: int, stop: int) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(need, compute) for the rows ``start:stop``: the box of the voxels whose windows
        reach a varying voxel and the box it needs for their windows (a radius more, clipped);
        None when every window of these rows is flat."""
        if self.rows is None:
            return None
        r0, n0 = self.radii[0], self.shape[0]
        first, last = max(start, self.rows[0] - r0), min(stop, self.rows[1] + r0 + 1)
        if first >= last:
            return None
        plane = self.varying[max(0, first - r0) : min(n0, last + r0)].any(dim=0)
        need = [slice(first, last)]
        for axis in range(plane.dim()):
            along = plane.any(dim=tuple(d for d in range(plane.dim()) if d != axis)) if plane.dim() > 1 else plane
            found = torch.nonzero(along).flatten()
            if found.numel() == 0:
                return None
            r, n = self.radii[axis + 1], self.shape[axis + 1]
            need.append(slice(max(0, int(found[0]) - r), min(n, int(found[-1]) + r + 1)))
        compute = tuple(
            slice(max(0, part.start - r), min(n, part.stop + r)) for part, r, n in zip(need, self.radii, self.shape)
        )
        return tuple(need), compute

    def square_sum(self, name: str, start: int, stop: int, need: tuple[slice, ...] | None) -> float:
        """Sum of the squared local NCC of the flat windows of rows ``start:stop`` (every voxel
        there outside ``need``)."""
        every = [slice(start, stop)] + [slice(None)] * (len(self.shape) - 1)
        total = self._contract(self.squares[name], every)
        return total - (self._contract(self.squares[name], need) if need is not None else 0.0)

    def _contract(self, squares: Tensor, box: Sequence[slice]) -> float:
        """Sum of ``squares`` at the patterns of the voxels of ``box``: per axis a histogram
        of the patterns, contracted with ``squares`` one axis at a time (float64)."""
        value = squares
        for pattern, part, size in zip(self.patterns, box, self._small):
            counts = torch.bincount(pattern[part], minlength=size).double()
            value = torch.tensordot(counts, value, dims=([0], [0]))
        return float(value)


def _row_sums(channels: Tensor, keep: slice) -> Tensor:
    """Sum of each channel of ``channels`` ``(C, 1, rows, ...)`` over the rows ``keep``: torch's
    pairwise float32 sum within the slab (no copy), as float64 to be accumulated across slabs."""
    return channels[:, :, keep].sum(dim=tuple(range(1, channels.ndim))).double()


def _pearson_and_mse(fixed_sums: Tensor, sums: Tensor, voxels: float) -> dict[str, float]:
    """Global NCC and MSE from :func:`slab_measures`' float64 sums (standardised images: NCC is
    their Pearson correlation, unchanged by the standardisation; a constant image has NCC 0)."""
    mean_a, mean_aa = (float(v) / voxels for v in fixed_sums)
    mean_b, mean_bb, mean_ab, squared = (float(v) / voxels for v in sums)
    var_a, var_b = mean_aa - mean_a * mean_a, mean_bb - mean_b * mean_b
    ncc = (mean_ab - mean_a * mean_b) / math.sqrt(var_a * var_b) if var_a > 1e-12 and var_b > 1e-12 else 0.0
    return {"ncc": ncc, "mse": squared}


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
    grid; MI expects intensities in [0, 1]. The local NCCs are computed together, slab by
    slab with the global NCC and MSE (:func:`slab_measures`: the fixed image's moments once per
    slab for all of them).
    """
    f, m, w = as_image(fixed), as_image(moving), as_image(warped)
    others = {"before": m, "after": w, **({"raw": as_image(raw)} if raw is not None else {})}
    if any(tuple(image.shape) != tuple(f.shape) for image in others.values()):
        shapes = ", ".join(str(tuple(image.shape)) for image in (f, *others.values()))
        raise ValueError(f"fixed, moving and warped (and raw) differ in shape: {shapes}")
    report: dict[str, float] = {}
    with torch.no_grad():
        measures = slab_measures(f, others, window)
        mi = losses.mutual_information_many(f, list(others.values()), bins, max_voxels=max_voxels)
        for suffix, mi_value in zip(others, mi):
            values = {**measures[suffix], "mi": float(mi_value)}
            report.update({f"{key}_{suffix}": values[key] for key in ("ncc", "local_ncc", "mi", "mse")})
    return report


def global_similarity(fixed: ArrayLike, other: ArrayLike) -> tuple[float, float]:
    """(global NCC, MI in nats) of two [0, 1] images on one grid."""
    values = similarities(fixed, other)
    return values["ncc"], values["mi"]
