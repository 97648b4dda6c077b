"""Training data: :class:`TrainingSet` (every scan loaded once, normalised to [0, 1],
resampled onto one grid and cached as one float32 tensor ``(N, 1, *S)``; pairs drawn from a
seeded ``torch.Generator``), the ``.pt`` cache, and :func:`scan_list` (files, folders, globs
and CSV scan lists read with :func:`voxreg.io.tables.read_table`)."""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import io
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.io.tables import read_table

__all__ = ["TrainingSet", "scan_list", "VAL_PAIRS"]

#: at most this many validation pairs
VAL_PAIRS = 8
#: entries every cache written by :meth:`TrainingSet.save` holds
_CACHE_KEYS = frozenset({"images", "labels", "has_labels", "affine", "key"})


def _resize(tensor: Tensor, shape: Sequence[int], nearest: bool) -> Tensor:
    """Resample ``(1, C, *S)`` onto ``shape`` over the same extent (align_corners grid)."""
    old = tensor.shape[2:]
    if tuple(old) == tuple(shape):
        return tensor
    ndim = len(shape)
    scale = torch.tensor([(o - 1) / max(s - 1, 1) for o, s in zip(old, shape)])
    coords = spatial.identity_grid(shape) * scale.view(1, ndim, *([1] * ndim))
    return spatial.sample(tensor, coords, "nearest" if nearest else "linear")


@dataclass
class TrainingSet:
    """Scans on one grid: ``images`` float32 ``(N, 1, *S)`` in [0, 1]; ``labels`` int64
    ``(N, 1, *S)`` or None; ``has_labels`` bool ``(N,)``; ``affine`` of the common grid.

    With ``atlas=True`` the last image is an atlas: pairs are always scan -> atlas
    (scan-to-atlas training); otherwise pairs are two distinct scans (scan-to-scan).
    """

    images: Tensor
    labels: Tensor | None = None
    has_labels: Tensor | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    atlas: bool = False
    #: optional group of each scan ``(N,)``: pairs are drawn within one group (e.g. brain-extracted
    #: scans with brain-extracted ones, heads with heads); None draws any two scans
    groups: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() not in (4, 5) or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, *spatial), got {tuple(self.images.shape)}")
        if len(self) < 2:
            raise VoxregError(f"training needs at least 2 scans (or 1 scan and an atlas), got {len(self)}")
        self.images = self.images.float().contiguous()
        if self.labels is not None:
            if self.labels.shape != self.images.shape:
                raise ValueError(f"labels {tuple(self.labels.shape)} must match images {tuple(self.images.shape)}")
            self.labels = self.labels.long()
            if self.has_labels is None:
                self.has_labels = torch.ones(len(self), dtype=torch.bool)
        self.has_labels = (
            self.has_labels.bool() if self.has_labels is not None else torch.zeros(len(self), dtype=torch.bool)
        )
        if self.groups is not None:
            self.groups = torch.as_tensor(self.groups, dtype=torch.long)
            if self.groups.shape != (len(self),):
                raise ValueError(f"groups must have one entry per scan ({len(self)}), got {tuple(self.groups.shape)}")
            if self.atlas:
                raise VoxregError("pairs within groups need scan-to-scan training (no atlas)")
            sizes = torch.bincount(self.groups)
            if bool(((sizes > 0) & (sizes < 2)).any()):
                raise VoxregError("every group of scans (folder) needs at least 2 scans to draw pairs from")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3)."""
        return self.images.dim() - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the common grid."""
        return tuple(self.images.shape[2:])

    @property
    def num_classes(self) -> int:
        """Largest label + 1 (0 without labels)."""
        return int(self.labels.max()) + 1 if self.labels is not None else 0

    @classmethod
    def from_images(
        cls,
        scans: Sequence[Image],
        labels: Sequence[Image | None] | None = None,
        shape: Sequence[int] | None = None,
        atlas: Image | None = None,
        atlas_labels: Image | None = None,
        voxel_size: float | None = None,
    ) -> TrainingSet:
        """Normalise each scan to [0, 1] and resample scans (linear) and labels (nearest)
        onto the first scan's grid (the atlas grid when ``atlas`` is given) in world space,
        then onto ``shape`` when given, else with ``voxel_size`` onto the same extent at
        about that voxel size (a model's space)."""
        if labels is not None and len(labels) != len(scans):
            raise VoxregError(f"got {len(labels)} label maps for {len(scans)} scans")
        if atlas is not None:
            labels = [*(labels if labels is not None else [None] * len(scans)), atlas_labels]
            scans = [*scans, atlas]
            if all(lab is None for lab in labels):
                labels = None
        if len(scans) < 2:
            raise VoxregError(f"training needs at least 2 scans (or 1 scan and an atlas), got {len(scans)}")
        ref = scans[-1] if atlas is not None else scans[0]
        if shape is None and voxel_size is not None:
            shape = tuple(max(2, round(n * v / voxel_size)) for n, v in zip(ref.shape, ref.spacing))
        target = tuple(int(s) for s in shape) if shape is not None else ref.shape
        if len(target) != ref.ndim or min(target) < 2:
            raise VoxregError(f"shape {target} does not fit {ref.ndim}D scans")
        images, label_list, has = [], [], []
        for i, scan in enumerate(scans):
            norm = scan.with_array(io.normalize_intensity(scan.array))
            images.append(_resize(_grid_tensor(norm, ref), target, nearest=False))
            lab = labels[i] if labels is not None else None
            has.append(lab is not None)
            label_list.append(
                _resize(_grid_tensor(io.as_label_image(lab), ref), target, True)
                if lab is not None
                else torch.zeros(1, 1, *target)
            )
        affine = _scaled_affine(ref, target)
        return cls(
            torch.cat(images),
            torch.cat(label_list).long() if any(has) else None,
            torch.tensor(has),
            affine,
            atlas=atlas is not None,
        )

    @classmethod
    def from_paths(
        cls,
        scans: Sequence[str | os.PathLike[str]],
        labels: Sequence[str | os.PathLike[str] | None] | None = None,
        shape: Sequence[int] | None = None,
        cache: str | os.PathLike[str] | None = None,
        atlas: str | os.PathLike[str] | None = None,
        atlas_labels: str | os.PathLike[str] | None = None,
        voxel_size: float | None = None,
    ) -> TrainingSet:
        """Load every scan (and label map, atlas) once; reuse/write the ``.pt`` ``cache`` when
        given (it is rebuilt when the file list, shape or voxel size differ)."""
        key = _cache_key(
            [*scans, *([atlas] if atlas else [])],
            [*labels, atlas_labels] if labels is not None and atlas else labels,
            shape,
        ) + (f"|voxel:{voxel_size}" if shape is None and voxel_size is not None else "")
        if cache is not None and Path(cache).is_file():
            found = cls.load(cache)
            if found[1] == key:
                return found[0]
        images = [io.load_image(p) for p in scans]
        label_images = (
            [io.load_image(p, label=True) if p is not None else None for p in labels] if labels is not None else None
        )
        atlas_image = io.load_image(atlas) if atlas is not None else None
        atlas_label_image = io.load_image(atlas_labels, label=True) if atlas_labels is not None else None
        out = cls.from_images(images, label_images, shape, atlas_image, atlas_label_image, voxel_size)
        if cache is not None:
            out.save(cache, key)
        return out

    def save(self, path: str | os.PathLike[str], key: str = "") -> Path:
        """Write the cached tensors to a ``.pt`` file atomically."""
        payload = {
            "images": self.images,
            "labels": self.labels,
            "has_labels": self.has_labels,
            "affine": torch.from_numpy(np.asarray(self.affine, dtype=np.float64)),
            "key": key,
            "atlas": self.atlas,
        }
        with io.atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[TrainingSet, str]:
        """Read a cache written by :meth:`save`: ``(training set, key)``."""
        problem = "not a voxreg training cache (unreadable or corrupt); delete it or pass another --cache file"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except MemoryError as exc:
            raise VoxregError(f"{path}: training cache too large to load into memory") from exc
        except Exception as exc:  # noqa: BLE001 - torch's text is many lines of pickle advice
            raise VoxregError(f"{path}: {problem}") from exc
        if not isinstance(data, dict) or not _CACHE_KEYS <= set(data):
            raise VoxregError(f"{path}: {problem}")
        try:
            return cls(
                data["images"],
                data["labels"],
                data["has_labels"],
                data["affine"].numpy(),
                bool(data.get("atlas", False)),
            ), str(data.get("key", ""))
        except VoxregError:
            raise
        except Exception as exc:  # noqa: BLE001 - tensors of the wrong type or shape
            raise VoxregError(f"{path}: {problem}") from exc

    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random (moving, fixed) index pairs of distinct scans (scan -> atlas in atlas
        mode), each ``(batch_size,)``."""
        n = len(self)
        if self.atlas:
            moving = torch.randint(0, n - 1, (batch_size,), generator=generator)
            return moving, torch.full_like(moving, n - 1)
        moving = torch.randint(0, n, (batch_size,), generator=generator)
        if self.groups is not None:
            return moving, self._partners_in_group(moving, generator)
        offset = torch.randint(1, n, (batch_size,), generator=generator)
        return moving, (moving + offset) % n

    def grouped_by(self, keys: Sequence[Any]) -> TrainingSet:
        """A copy whose pairs are drawn within groups of equal ``keys`` (one key per scan,
        e.g. its folder)."""
        if len(keys) != len(self):
            raise ValueError(f"got {len(keys)} group keys for {len(self)} scans")
        names = sorted(set(map(str, keys)))
        groups = torch.tensor([names.index(str(key)) for key in keys])
        return TrainingSet(self.images, self.labels, self.has_labels, self.affine, self.atlas, groups)

    def _partners_in_group(self, moving: Tensor, generator: torch.Generator) -> Tensor:
        """For each moving index, a random other scan of the same group."""
        assert self.groups is not None
        partners = []
        for index in moving.tolist():
            members = torch.nonzero(self.groups == self.groups[index]).flatten()
            others = members[members != index]
            partners.append(others[torch.randint(0, len(others), (1,), generator=generator)])
        return torch.cat(partners)

    def validation_pairs(self) -> list[tuple[int, int]]:
        """Deterministic pairs ``(i, i+1)`` (``(i, atlas)`` in atlas mode; at most 8) used
        for validation."""
        n = len(self)
        if self.atlas:
            return [(i, n - 1) for i in range(min(n - 1, VAL_PAIRS))]
        return [(i, (i + 1) % n) for i in range(min(n, VAL_PAIRS))]

    def resized(self, scale: float) -> TrainingSet:
        """A copy on a grid ``scale`` times the size (area-averaged images, nearest labels;
        voxel centres follow the half-voxel convention, and so does the new affine)."""
        shape = tuple(max(4, round(s * scale)) for s in self.shape)
        images = F.interpolate(self.images, size=shape, mode="area")
        labels = (
            F.interpolate(self.labels.float(), size=shape, mode="nearest-exact").long()
            if self.labels is not None
            else None
        )
        ratio = np.array([old / new for old, new in zip(self.shape, shape)])
        step = np.eye(4)
        step[:3, :3] = np.diag(np.pad(ratio, (0, 3 - len(ratio)), constant_values=1.0))
        step[: len(ratio), 3] = 0.5 * ratio - 0.5
        affine = np.asarray(self.affine, dtype=np.float64) @ step
        return TrainingSet(images, labels, self.has_labels, affine, self.atlas, self.groups)


def _grid_tensor(image: Image, ref: Image) -> Tensor:
    """``image`` resampled onto ``ref``'s grid, as a ``(1, 1, *S)`` tensor."""
    out = io.resample_to(image, ref) if image is not ref else image
    return torch.from_numpy(np.ascontiguousarray(out.array))[None, None]


def _scaled_affine(ref: Image, shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid of ``shape`` covering the same extent as ``ref`` (corner voxels kept)."""
    affine = ref.affine.copy()
    for axis, (old, new) in enumerate(zip(ref.shape, shape)):
        affine[:3, axis] *= (old - 1) / max(new - 1, 1)
    return affine


def _cache_key(scans: Sequence[Any], labels: Sequence[Any] | None, shape: Any) -> str:
    """Identity of a cache: resolved scan and label paths and the requested shape."""
    parts = [str(Path(p).resolve()) for p in scans]
    parts += ["labels:"] + (
        [str(Path(p).resolve()) if p is not None else "-" for p in labels] if labels is not None else []
    )
    return "|".join(parts + [f"shape:{tuple(shape) if shape is not None else None}"])


def scan_list(items: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[Path | None]]:
    """Expand training inputs into scans and label maps (None where absent).

    Each item is an image file, a folder (every readable image file inside, sorted),
    a glob pattern, or a CSV whose first column is a scan and optional second column its
    label map (relative paths are relative to the CSV).
    """
    scans: list[Path] = []
    labels: list[Path | None] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() == ".csv":
            rows = _csv_rows(path)
            scans += [row[0] for row in rows]
            labels += [row[1] for row in rows]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(io.READABLE_EXTS))
            scans += found
            labels += [None] * len(found)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(item)))
            scans += found
            labels += [None] * len(found)
        else:
            scans.append(path)
            labels.append(None)
    if not scans:
        raise VoxregError(f"no scans found in {', '.join(str(i) for i in items)}")
    return scans, labels


def _csv_rows(path: Path) -> list[tuple[Path, Path | None]]:
    """``(scan, labels)`` of a headerless CSV scan list (first column a scan, optional second
    its label map, relative to the CSV); a header row (scan/image/path), blank and ``#`` rows
    are skipped."""
    rows = []
    for row in _raw_rows(path):
        if not row or row[0].strip().lower() in ("", "scan", "image", "path") or row[0].startswith("#"):
            continue
        scan = (path.parent / row[0].strip()).resolve()
        label = (path.parent / row[1].strip()).resolve() if len(row) > 1 and row[1].strip() else None
        rows.append((scan, label))
    return rows


def _raw_rows(path: Path) -> list[list[str]]:
    """Every row of a CSV that may have no header, as lists of cells, read through
    :func:`read_table` (its header row is the first row)."""
    records = read_table(path, "a CSV scan list")
    if not records:  # at most one line: read_table took it as the header
        text = path.read_text(encoding="utf-8-sig").splitlines()[:1]
        return [row for row in csv.reader(text)]
    header = [key for key in records[0] if key is not None]
    rows = [header]
    for record in records:
        cells = [record[key] for key in header if record.get(key) is not None]
        rows.append(cells + list(record.get(None) or []))
    return rows
