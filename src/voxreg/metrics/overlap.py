"""Label overlap: Dice per label, the symmetric 95th-percentile Hausdorff distance (HD95)
and both per structure, on label maps sharing one grid (spacing in mm per array axis)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from voxreg.metrics._arrays import ArrayLike, as_numpy

HD_MARGIN = 2  # voxels of background kept around each structure's bounding box


# --------------------------------------------------------------------------- Dice


#: voxels per chunk when counting labels: bounded temporaries (no int64 copy of a whole map)
COUNT_CHUNK = 1 << 20


def _as_labels(array: np.ndarray) -> np.ndarray:
    """Integer label values of a flat map (floats rounded first)."""
    return np.rint(array).astype(np.int64) if np.issubdtype(array.dtype, np.floating) else array


def _label_counts(
    fixed: np.ndarray, warped_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(sorted label values, voxels of each in ``fixed``, in each of ``warped_maps``, in both
    ``fixed`` and that map at the same voxel). Small non-negative integer labels are counted by
    value a chunk of :data:`COUNT_CHUNK` voxels at a time, ``fixed``'s chunk converted and
    counted once for every map; others (floats are rounded first) through their unique values."""
    flat_f = fixed.ravel()
    flats = [warped.ravel() for warped in warped_maps]
    low = min(float(flat.min()) for flat in [flat_f, *flats])
    high = max(float(flat.max()) for flat in [flat_f, *flats])
    if low >= -0.5 and high < (1 << 24) - 0.5:  # small non-negative labels: index by value directly
        k = int(np.rint(high)) + 1
        count_f = np.zeros(k, dtype=np.int64)
        counts_w = [np.zeros(k, dtype=np.int64) for _ in flats]
        overlaps = [np.zeros(k, dtype=np.int64) for _ in flats]
        for start in range(0, flat_f.size, COUNT_CHUNK):
            part_f = _as_labels(flat_f[start : start + COUNT_CHUNK]).astype(np.intp, copy=False)
            count_f += np.bincount(part_f, minlength=k)
            for flat, count_w, overlap in zip(flats, counts_w, overlaps):
                part_w = _as_labels(flat[start : start + COUNT_CHUNK]).astype(np.intp, copy=False)
                count_w += np.bincount(part_w, minlength=k)
                overlap += np.bincount(part_f[part_f == part_w], minlength=k)
        return np.arange(k), count_f, counts_w, overlaps
    values, inverse = np.unique(np.concatenate([_as_labels(flat_f), *map(_as_labels, flats)]), return_inverse=True)
    k, n = values.size, flat_f.size
    index_f = inverse[:n]
    counts_w, overlaps = [], []
    for i in range(len(flats)):
        index_w = inverse[n * (i + 1) : n * (i + 2)]
        counts_w.append(np.bincount(index_w, minlength=k))
        overlaps.append(np.bincount(index_f[index_f == index_w], minlength=k))
    return values, np.bincount(index_f, minlength=k), counts_w, overlaps


def dice_per_label(
    fixed_labels: ArrayLike, warped_labels: ArrayLike, labels: Sequence[int] | None = None
) -> dict[int, float]:
    """Dice ``2|F=l & W=l| / (|F=l| + |W=l|)`` for each label ``l``.

    ``labels`` defaults to the labels present in both maps, excluding 0 (background).
    A requested label absent from both maps gives NaN. Counts come from ``np.bincount``
    (:func:`_label_counts`; no loop over voxels).
    """
    return dice_per_label_many(fixed_labels, [warped_labels], labels)[0]


def dice_per_label_many(
    fixed_labels: ArrayLike, warped_maps: Sequence[ArrayLike], labels: Sequence[int] | None = None
) -> list[dict[int, float]]:
    """:func:`dice_per_label` of each of ``warped_maps`` against ``fixed_labels`` (the fixed
    map converted and counted once for all of them; the same values)."""
    fixed, maps = as_numpy(fixed_labels), [as_numpy(warped) for warped in warped_maps]
    for warped in maps:
        if fixed.shape != warped.shape:
            raise ValueError(f"label maps differ in shape: {fixed.shape} vs {warped.shape}")
    if fixed.size == 0:
        return [{} for _ in maps]
    values, count_f, counts_w, overlaps = _label_counts(fixed, maps)
    return [_dice_of_counts(values, count_f, count_w, overlap, labels) for count_w, overlap in zip(counts_w, overlaps)]


def _dice_of_counts(
    values: np.ndarray, count_f: np.ndarray, count_w: np.ndarray, overlap: np.ndarray, labels: Sequence[int] | None
) -> dict[int, float]:
    """Dice per label from :func:`_label_counts`' counts (labels present in both, not 0, by default)."""
    k = values.size
    if labels is None:
        present = (count_f > 0) & (count_w > 0) & (values != 0)
        labels = values[present].tolist()
    result = {}
    for label in labels:
        i = int(np.searchsorted(values, label))  # values are sorted
        found = i < k and values[i] == label
        total = count_f[i] + count_w[i] if found else 0
        result[int(label)] = float(2.0 * overlap[i] / total) if total > 0 else float("nan")
    return result


def common_labels(
    fixed_labels: ArrayLike, moving_labels: ArrayLike, exclude: Iterable[int] = (0,), keep: Iterable[int] | None = None
) -> list[int]:
    """Sorted labels present in both maps, minus ``exclude``, restricted to ``keep`` when given."""
    labels = set(np.unique(as_numpy(fixed_labels)).tolist()) & set(np.unique(as_numpy(moving_labels)).tolist())
    labels -= {int(v) for v in exclude}
    if keep is not None:
        labels &= {int(v) for v in keep}
    return sorted(int(v) for v in labels)


# --------------------------------------------------------------------------- HD95


def hd95(fixed_mask: ArrayLike, warped_mask: ArrayLike, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two binary masks on one
    grid with voxel ``spacing`` (mm per array axis): max of the two directed 95th percentiles
    of surface-voxel to nearest-surface-voxel distances (MONAI's definition; surfaces by face
    connectivity). NaN when either mask is empty; 0 for identical masks."""
    import SimpleITK as sitk

    a, b = as_numpy(fixed_mask).astype(bool), as_numpy(warped_mask).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return float("nan")
    box = _bounding_box(a | b, HD_MARGIN)
    a, b = np.pad(a[box], 1), np.pad(b[box], 1)  # zero border: structures at the edge get a surface
    surface_a, surface_b = _surface(a, spacing, sitk), _surface(b, spacing, sitk)
    to_b = _distance_to(surface_b, spacing, sitk)[surface_a]
    to_a = _distance_to(surface_a, spacing, sitk)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    from scipy import ndimage  # here, not at import: Dice alone never needs it (0.2 s of scipy)

    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def _to_sitk(mask: np.ndarray, spacing: Sequence[float], sitk: Any) -> Any:
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).T))  # array axis 0 = ITK x
    image.SetSpacing([float(s) for s in spacing])
    return image


def _surface(mask: np.ndarray, spacing: Sequence[float], sitk: Any) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it."""
    contour = sitk.LabelContour(_to_sitk(mask, spacing, sitk), fullyConnected=False, backgroundValue=0)
    return sitk.GetArrayFromImage(contour).T.astype(bool)


def _distance_to(surface: np.ndarray, spacing: Sequence[float], sitk: Any) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``surface``."""
    distance = sitk.SignedMaurerDistanceMap(
        _to_sitk(surface, spacing, sitk), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    values = np.abs(sitk.GetArrayFromImage(distance).T)
    values[surface] = 0.0
    return values


# --------------------------------------------------------------------------- per structure


def structure_scores(
    fixed_labels: ArrayLike, warped_labels: ArrayLike, labels: Sequence[int], spacing: Sequence[float]
) -> dict[int, tuple[float, float]]:
    """``{label: (dice, hd95_mm)}`` for each label (Dice from :func:`dice_per_label`, HD95 from
    :func:`hd95` on each structure's bounding box, found for all labels in one pass)."""
    fixed_labels, warped_labels = as_numpy(fixed_labels), as_numpy(warped_labels)
    dice = dice_per_label(fixed_labels, warped_labels, labels)
    fixed_boxes, warped_boxes = _label_boxes(fixed_labels, labels), _label_boxes(warped_labels, labels)
    scores = {}
    for label in (int(v) for v in labels):
        boxes = [b for b in (fixed_boxes.get(label), warped_boxes.get(label)) if b is not None]
        if len(boxes) < 2:  # absent on one side
            scores[label] = (dice[label], float("nan"))
            continue
        box = tuple(
            slice(max(min(a.start, b.start) - HD_MARGIN, 0), max(a.stop, b.stop) + HD_MARGIN) for a, b in zip(*boxes)
        )
        scores[label] = (dice[label], hd95(fixed_labels[box] == label, warped_labels[box] == label, spacing))
    return scores


def _label_boxes(array: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each of ``labels`` present in ``array`` (positive codes below 2^20 in
    one ``find_objects`` pass, any others one by one)."""
    from scipy import ndimage

    fast = [int(v) for v in labels if 0 < int(v) < 1 << 20]
    found: dict[int, tuple[slice, ...]] = {}
    if fast:
        top = max(fast)
        codes = np.where((array > 0) & (array <= top), array, 0).astype(np.int32, copy=False)
        boxes = ndimage.find_objects(codes, max_label=top)
        found.update({label: boxes[label - 1] for label in fast if boxes[label - 1] is not None})
    for label in (int(v) for v in labels if not 0 < int(v) < 1 << 20):
        mask = array == label
        if mask.any():
            found[label] = ndimage.find_objects(mask.astype(np.uint8))[0]
    return found
