"""Synthetic training pairs from label maps (SynthMorph recipe, Hoffmann et al., IEEE TMI 2022).

A registration network trained on these pairs never sees a real patient scan. One pair::

    base label map  (one per sample, from a source below, (N, 1, *S) int64)
      -> fixed_labels  = warp(base, u_f, nearest)   # u_f, u_m: independent random smooth
      -> moving_labels = warp(base, u_m, nearest)   #   diffeomorphic fields, size x difficulty
      -> each image on its own: Gaussian mixture (random mean/std per label, background dark
         with some probability) -> Gaussian blur (partial volume) -> smooth multiplicative
         bias exp(B) -> additive noise -> optional low resolution along random axes (area
         down-, linear up-sampling) -> min-max to [0, 1] -> random gamma

T1 pairs (``brain`` source, probability ``t1_prob``): the images are the MNI152 T1 instead
of a Gaussian mixture, carried through exactly the geometry of the labels (fitted to the
grid like the parcellation, the same anatomy warp, then each image = the anatomy's T1
warped by the pair's field, all linear) and then augmented like a mixture image (blur,
bias, noise, low resolution, min-max, gamma: :func:`augment_intensities`).

Random smooth fields: a velocity of Gaussian noise on a coarse control grid (spacing
``smoothness`` voxels), linearly upsampled to an integration grid (1/``integration_downsample``
of the output), smoothed, scaled so that its largest vector norm is the requested size,
integrated by scaling and squaring and linearly resized to the output grid. Fields follow
voxreg's convention: ``(N, ndim, *S)`` float32 in voxels, channel ``d`` = array axis ``d``.

Label sources (mixed per sample by ``SynthConfig.sources``):

- ``shapes``: argmax of K Gaussian-noise channels drawn on a coarse grid and linearly
  upsampled (through a random smooth warp) on a 1/``label_downsample`` grid;
- ``brain``: the MNI152 tissue labels (background, CSF, GM, WM) split into parcels by k-means
  of voxel coordinates within each tissue (fixed by ``seed``, cached at the working
  resolution), each sample a new "anatomy" by a random per-axis scaling and a large random
  smooth diffeomorphic warp; 2D configs take axial slices near the centre; with
  ``t1_prob`` the T1 template follows the same fit, warp and slice as a pair's images;
- ``user``: integer label maps given to :class:`SynthGenerator`, relabelled jointly to
  ``0..K-1`` (sorted codes) and resampled (nearest) to the working shape.

All randomness comes from the ``torch.Generator`` given to :meth:`SynthGenerator.sample`
(same state -> identical batch, on the same device). Nothing is read from disk apart from
the MNI152 files for the ``brain`` source.

Licences: the ``brain`` source derives from the MNI152 ICBM 2009a symmetric template and its
tissue maps as shipped inside the nilearn wheel (nothing is downloaded). The MNI template
licence permits use, copying and redistribution of derived works provided the copyright
notice is kept: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University. The ``shapes`` source is pure noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg.core import spatial
from voxreg.core.config import check_int as _core_check_int
from voxreg.core.config import check_number as _core_check_number
from voxreg.io.templates import mni152_template, mni152_tissue_labels

__all__ = [
    "SOURCES",
    "SynthConfig",
    "SynthBatch",
    "SynthGenerator",
    "augment_intensities",
    "brain_parcellation",
    "gaussian_blur",
    "mixture_images",
    "one_hot",
    "random_smooth_field",
    "random_shapes",
    "relabel_consecutive",
    "synthesize_images",
]

SOURCES = ("shapes", "brain", "user")
_TISSUES = (1, 2, 3)  # CSF, GM, WM in mni152_tissue_labels
_KMEANS_ITERATIONS = 15
_BRAIN_MARGIN = 1.06  # the fitted brain bounding box fills ~94 % of the working grid
_SLICE_BAND = (0.4, 0.65)  # 2D brain: axial slices from this fraction of the height


# --------------------------------------------------------------------------- config


def _check_number(name: str, value: Any, low: float, high: float) -> float:
    return _core_check_number(name, value, low=low, high=None if math.isinf(high) else high)


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    return _core_check_int(name, int(value) if isinstance(value, np.integer) else value, low, high)


def _check_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """A ``(lo, hi)`` pair with ``low <= lo <= hi <= high``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair within [{low}, {high}], got {value!r}")
    lo = _check_number(f"{name}[0]", value[0], low, high)
    hi = _check_number(f"{name}[1]", value[1], low, high)
    if lo > hi:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return lo, hi


@dataclass
class SynthConfig:
    """What :class:`SynthGenerator` draws. Sizes are in voxels of the output grid ``shape``;
    a ``(min, max)`` pair is drawn uniformly per sample (per image for intensities).

    Deformation of a pair: ``max_displacement`` (largest vector norm, voxels) x ``difficulty``
    (curriculum in [0, 1]: 0 gives identical fixed and moving label maps), correlation
    length ``smoothness`` (control-point spacing, voxels).
    Intensities: per-label ``mean_range``/``std_range`` (Gaussian mixture, in [0, 1] units),
    ``dark_background_prob``, ``blur_sigma`` (voxels), ``bias_strength`` (largest std of the
    log bias field), ``noise_std`` (largest std of additive noise), ``gamma_std`` (std of
    log gamma), ``lowres_prob``/``lowres_factor`` (down- then up-sampling by up to this
    factor along random axes).
    ``t1_prob``: probability that a ``brain`` pair's two images are the MNI152 T1 (carried
    through the pair's geometry, then augmented) instead of a Gaussian mixture.
    """

    shape: tuple[int, ...] = (64, 80, 64)
    sources: dict[str, float] = field(default_factory=lambda: {"shapes": 0.5, "brain": 0.5})
    difficulty: float = 1.0
    max_displacement: tuple[float, float] = (2.0, 8.0)
    smoothness: tuple[float, float] = (10.0, 20.0)
    integration_steps: int = 7
    integration_downsample: int = 4
    num_shape_labels: int = 26
    shape_smoothness: tuple[float, float] = (6.0, 16.0)
    shape_warp: float = 4.0
    label_downsample: int = 2
    num_brain_labels: int = 32
    anatomy_displacement: tuple[float, float] = (2.0, 6.0)
    anatomy_smoothness: tuple[float, float] = (12.0, 24.0)
    scale_range: float = 0.1
    mean_range: tuple[float, float] = (0.0, 1.0)
    std_range: tuple[float, float] = (0.0, 0.08)
    dark_background_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    bias_strength: float = 0.3
    bias_smoothness: float = 32.0
    noise_std: float = 0.03
    gamma_std: float = 0.25
    lowres_prob: float = 0.25
    lowres_factor: float = 3.0
    same_contrast: float = 0.0
    tissue_contrast: float = 0.0
    tissue_jitter: float = 0.03
    t1_prob: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        shape = self.shape
        if (
            isinstance(shape, (str, bytes))
            or not isinstance(shape, Sequence)
            or len(shape) not in (2, 3)
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 8 <= s <= 1024 for s in shape)
        ):
            raise ValueError(f"shape must be 2 or 3 ints in [8, 1024], got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.sources = self._check_sources(self.sources)
        self.difficulty = _check_number("difficulty", self.difficulty, 0.0, 1.0)
        for name, low, high in (
            ("max_displacement", 0.0, 64.0),
            ("smoothness", 2.0, 512.0),
            ("shape_smoothness", 2.0, 512.0),
            ("anatomy_displacement", 0.0, 64.0),
            ("anatomy_smoothness", 2.0, 512.0),
            ("mean_range", 0.0, 1.0),
            ("std_range", 0.0, 1.0),
            ("blur_sigma", 0.0, 4.0),
        ):
            setattr(self, name, _check_range(name, getattr(self, name), low, high))
        for name, low, high in (
            ("shape_warp", 0.0, 64.0),
            ("scale_range", 0.0, 0.5),
            ("dark_background_prob", 0.0, 1.0),
            ("bias_strength", 0.0, 2.0),
            ("bias_smoothness", 4.0, 1024.0),
            ("noise_std", 0.0, 1.0),
            ("gamma_std", 0.0, 1.0),
            ("lowres_prob", 0.0, 1.0),
            ("lowres_factor", 1.0, 8.0),
            ("same_contrast", 0.0, 1.0),
            ("tissue_contrast", 0.0, 1.0),
            ("tissue_jitter", 0.0, 1.0),
            ("t1_prob", 0.0, 1.0),
        ):
            setattr(self, name, _check_number(name, getattr(self, name), low, high))
        for name, low, high in (
            ("integration_steps", 0, 20),
            ("integration_downsample", 1, 16),
            ("num_shape_labels", 2, 256),
            ("label_downsample", 1, 8),
            ("num_brain_labels", 4, 256),
            ("seed", 0, 2**63 - 1),
        ):
            setattr(self, name, _check_int(name, getattr(self, name), low, high))

    @staticmethod
    def _check_sources(sources: Any) -> dict[str, float]:
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError(f"sources must be a non-empty dict of {SOURCES} -> weight >= 0, got {sources!r}")
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"sources has unknown names {unknown}; allowed: {list(SOURCES)}")
        out = {k: _check_number(f"sources[{k!r}]", v, 0.0, math.inf) for k, v in sources.items()}
        if sum(out.values()) <= 0:
            raise ValueError(f"sources weights must sum to > 0, got {sources!r}")
        return out

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-safe) of the config; :meth:`from_dict` inverts it."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown synth config keys {unknown}; allowed: {sorted(known)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


# --------------------------------------------------------------------------- random helpers


def _uniform(lo_hi: tuple[float, float], n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` values uniform in ``[lo, hi]`` (float32, on ``device``)."""
    lo, hi = lo_hi
    return (lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)).to(device)


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


def _view(values: Tensor, ndim: int) -> Tensor:
    """``(N,)`` -> ``(N, 1, 1, ...)`` for broadcasting over ``(N, C, *spatial)``."""
    return values.view(-1, *([1] * (ndim + 1)))


def _coarse_size(shape: Sequence[int], spacing: float) -> tuple[int, ...]:
    """Control grid with about one node per ``spacing`` voxels (>= 2 nodes per axis)."""
    return tuple(max(2, int(round((s - 1) / spacing)) + 1) for s in shape)


def _interpolate(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Linear resampling over the same extent (align_corners=True), no value rescaling."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def gaussian_blur(x: Tensor, sigma: Tensor | float, truncate: float = 2.5) -> Tensor:
    """Separable Gaussian blur of ``(N, C, *S)`` with one ``sigma`` (voxels) per sample
    (a float or an ``(N,)`` tensor); edges replicate. Sigma ~0 leaves a sample unchanged.

    Shift-and-add along each axis (a few fused multiply-adds of the whole tensor): much
    faster on CPU than depthwise 3D convolutions with per-sample kernels.
    """
    n, c, *size = x.shape
    ndim = len(size)
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(n)
    radius = int(truncate * float(sig.max()) + 0.5) if n else 0  # as scipy.ndimage
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sig.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 2 * radius + 1, *([1] * ndim))
    y = x
    for axis in range(ndim):
        dim = 2 + axis
        r = min(radius, size[axis] - 1)
        padded = torch.cat(
            [
                y.narrow(dim, 0, 1).expand(*y.shape[:dim], radius, *y.shape[dim + 1 :]),
                y,
                y.narrow(dim, size[axis] - 1, 1).expand(*y.shape[:dim], radius, *y.shape[dim + 1 :]),
            ],
            dim,
        )
        out = padded.narrow(dim, radius, size[axis]) * kernel[:, :, radius]
        for j in range(1, r + 1):
            out.addcmul_(
                padded.narrow(dim, radius - j, size[axis]) + padded.narrow(dim, radius + j, size[axis]),
                kernel[:, :, radius + j],
            )
        y = out
    return y


# --------------------------------------------------------------------------- fields


def _per_sample(value: float | Sequence[float] | Tensor, n: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1).cpu()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} must be a number or have one value per sample ({n}), got {t.numel()}")
    return t


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A 2D or 3D spatial shape with sizes >= 2, as a tuple of ints."""
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) not in (2, 3)
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 2 for s in shape)
    ):
        raise ValueError(f"shape must be 2 or 3 ints >= 2, got {shape!r}")
    return tuple(int(s) for s in shape)


def random_smooth_field(
    batch_size: int,
    shape: Sequence[int],
    max_displacement: float | Sequence[float] | Tensor,
    smoothness: float | Sequence[float],
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    steps: int = 7,
    downsample: int = 4,
) -> Tensor:
    """Random smooth diffeomorphic displacements ``(batch_size, ndim, *shape)`` in voxels.

    Velocity noise on a control grid (spacing ``smoothness`` voxels, per sample), linearly
    upsampled to a grid ``downsample`` times coarser than ``shape``, smoothed, scaled so its
    largest vector norm is ``max_displacement`` voxels (per sample; 0 gives exactly 0),
    integrated by scaling and squaring in ``steps`` steps (0: used as a displacement) and
    linearly resized to ``shape``. The displacement's largest norm is about the velocity's.
    """
    shape = _check_shape(shape)
    ndim, device = len(shape), torch.device(device)
    _check_int("steps", steps, 0, 30)
    _check_int("downsample", downsample, 1, 64)
    mags = _per_sample(max_displacement, batch_size, "max_displacement")
    spacings = _per_sample(smoothness, batch_size, "smoothness").tolist()
    if batch_size == 0 or float(mags.max()) <= 0:
        return torch.zeros((batch_size, ndim, *shape), device=device)
    grid = tuple(max(2, int(math.ceil((s - 1) / downsample)) + 1) for s in shape)
    unit = torch.tensor([(s - 1) / (g - 1) for s, g in zip(shape, grid)], device=device)  # voxels per grid step
    velocity = torch.cat(
        [_interpolate(_randn((1, ndim, *_coarse_size(shape, sp)), generator, device), grid) for sp in spacings]
    )
    sigma = torch.tensor([0.35 * sp for sp in spacings], device=device) / unit.min()
    velocity = gaussian_blur(velocity, sigma.clamp(max=0.5 * max(grid)))
    norm = (velocity * unit.view(1, ndim, *([1] * ndim))).square().sum(1).sqrt().flatten(1).amax(1)
    velocity = velocity * _view(mags.to(device) / norm.clamp_min(1e-12), ndim)
    disp = spatial.integrate_velocity(velocity, steps) if steps else velocity
    return spatial.resize_field(disp, shape).contiguous()


def _warp_labels(labels: Tensor, field_: Tensor, padding: Literal["border", "zeros"] = "border") -> Tensor:
    """Nearest-neighbour warp of an int64 label map; an all-zero field returns a copy."""
    if not bool(field_.any()):
        return labels.expand(field_.shape[0], *labels.shape[1:]).clone()
    return spatial.warp(labels, field_, mode="nearest", padding=padding)


def _warp_images(images: Tensor, field_: Tensor) -> Tensor:
    """Linear warp of float images (edges repeat), row by row with ``field_``; an all-zero
    field returns a copy."""
    if not bool(field_.any()):
        return images.clone()
    return spatial.warp(images, field_, mode="linear", padding="border")


# --------------------------------------------------------------------------- label maps


def one_hot(labels: Tensor, num_labels: int) -> Tensor:
    """``(N, 1, *S)`` integer labels in ``[0, num_labels)`` -> ``(N, num_labels, *S)`` float32."""
    if labels.dim() < 3 or labels.shape[1] != 1 or torch.is_floating_point(labels):
        raise ValueError(f"labels must be an integer tensor (N, 1, *spatial), got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got [{int(labels.min())}, {int(labels.max())}]")
    out = torch.zeros((labels.shape[0], num_labels, *labels.shape[2:]), device=labels.device)
    return out.scatter_(1, labels.long(), 1.0)


def _as_int64(labels: np.ndarray | Tensor, name: str) -> Tensor:
    """An integer (or bool) array/tensor as an int64 tensor; float dtypes raise ValueError."""
    if isinstance(labels, Tensor):
        if torch.is_floating_point(labels) or labels.is_complex():
            raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
        return labels.long()
    array = np.asarray(labels)
    if array.dtype.kind not in "biu":
        raise ValueError(f"{name} must have an integer dtype, got {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def relabel_consecutive(labels: np.ndarray | Tensor, codes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Map integer ``labels`` to ``0..K-1`` by rank of their code: returns ``(int64 labels,
    sorted codes)``. Given ``codes`` (sorted, int64), use them (every value must occur there)."""
    t = _as_int64(labels, "labels")
    if codes is None:
        codes = torch.unique(t)
    index = torch.searchsorted(codes, t).clamp(max=max(codes.numel() - 1, 0))
    if not bool((codes[index] == t).all()):
        raise ValueError("labels contain codes missing from codes")
    return index, codes


def _argmax_channels(x: Tensor) -> Tensor:
    """``x.argmax(1, keepdim=True)`` (first maximum wins) as a running maximum over the
    channels: contiguous passes, ~2x faster on CPU than a strided reduction over dim 1."""
    best = x[:, :1].clone()
    index = torch.zeros(best.shape, dtype=torch.int64, device=x.device)
    for k in range(1, x.shape[1]):
        value = x[:, k : k + 1]
        index.masked_fill_(value > best, k)
        torch.maximum(best, value, out=best)
    return index


def random_shapes(
    batch_size: int,
    shape: Sequence[int],
    num_labels: int,
    generator: torch.Generator,
    *,
    smoothness: tuple[float, float] = (6.0, 16.0),
    warp: float = 4.0,
    downsample: int = 2,
    device: torch.device | str = "cpu",
) -> Tensor:
    """SynthMorph shapes: argmax of ``num_labels`` Gaussian-noise channels on a control grid
    (spacing drawn in ``smoothness``), linearly upsampled through a random smooth warp (up to
    ``warp`` voxels) on a grid ``downsample`` times coarser, then nearest-upsampled to
    ``shape``. Returns ``(N, 1, *shape)`` int64 in ``[0, num_labels)``."""
    shape, device = _check_shape(shape), torch.device(device)
    _check_int("num_labels", num_labels, 2, 4096)
    _check_int("downsample", downsample, 1, 64)
    low = tuple(max(2, int(math.ceil(s / downsample))) for s in shape)
    spacings = _uniform(smoothness, batch_size, generator, torch.device("cpu")).tolist()
    fields_ = random_smooth_field(
        batch_size,
        low,
        warp / downsample,
        [sp / downsample for sp in spacings],
        generator,
        device=device,
        steps=7,
        downsample=4,
    )
    ident = spatial.identity_grid(low, device)
    out = []
    for i, sp in enumerate(spacings):
        coarse = _coarse_size(shape, sp)
        scale = torch.tensor([(c - 1) / (s - 1) for c, s in zip(coarse, low)], device=device)
        coords = (ident + fields_[i : i + 1]) * scale.view(1, -1, *([1] * len(shape)))
        noise = _randn((1, num_labels, *coarse), generator, device)
        out.append(_argmax_channels(spatial.sample(noise, coords, "linear", "border")))
    labels = torch.cat(out)
    if low != shape:
        labels = F.interpolate(labels.float(), size=shape, mode="nearest").long()
    return labels


@lru_cache(maxsize=1)
def _mni_tissue_labels_2mm() -> np.ndarray:
    """MNI152 tissue labels at 2 mm (0 bg, 1 CSF, 2 GM, 3 WM), computed once per process."""
    labels = np.array(mni152_tissue_labels(2).array, dtype=np.int16)
    labels.setflags(write=False)
    return labels


def _split_counts(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` parcels over tissues in proportion to their size, >= 1 each."""
    share = np.asarray(sizes, dtype=np.float64) / max(sum(sizes), 1) * (total - len(sizes))
    counts = np.floor(share).astype(int) + 1
    for i in np.argsort(-(share - np.floor(share)))[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster index of each point (Lloyd's algorithm from ``k`` random points; numpy and a
    k-d tree: a one-off precomputation that stays fast whatever torch's thread settings)."""
    from scipy.spatial import cKDTree

    centres = points[rng.choice(points.shape[0], size=k, replace=False)]
    for _ in range(_KMEANS_ITERATIONS):
        assign = cKDTree(centres).query(points)[1]
        counts = np.bincount(assign, minlength=k)[:, None]
        sums = np.stack([np.bincount(assign, weights=axis, minlength=k) for axis in points.T], 1)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)  # empty: keep
    return cKDTree(centres).query(points)[1]


@lru_cache(maxsize=8)
def brain_parcellation(num_labels: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNI152 (2 mm, 99x117x95, RAS) parcellation: ``(labels int16, tissue_of_label int16)``.

    Label 0 is background; labels ``1..num_labels-1`` split CSF, GM and WM (in this order)
    by k-means of voxel coordinates within each tissue, in proportion to tissue volume, so
    every parcel lies inside one tissue (``tissue_of_label[k]``: 0 bg, 1 CSF, 2 GM, 3 WM).
    Deterministic for a given ``seed``; cached (read-only arrays).
    """
    num_labels = _check_int("num_labels", num_labels, 4, 256)
    tissue = _mni_tissue_labels_2mm()
    sizes = [int((tissue == t).sum()) for t in _TISSUES]
    counts = _split_counts(sizes, num_labels - 1)
    rng = np.random.default_rng(int(seed))
    parcels = np.zeros(tissue.shape, np.int16)
    tissue_of = [0]
    for t, k in zip(_TISSUES, counts):
        where = np.nonzero(tissue == t)
        parcels[where] = _kmeans(np.stack(where, 1).astype(np.float64), k, rng) + len(tissue_of)
        tissue_of += [t] * k
    parcels.setflags(write=False)
    tissue_arr = np.asarray(tissue_of, np.int16)
    tissue_arr.setflags(write=False)
    return parcels, tissue_arr


def _brain_fit_coords(shape: tuple[int, ...]) -> Tensor:
    """Template voxel coordinates ``(1, 3, *out)`` that fit the brain (bounding box of the
    tissue labels, isotropic scale, centred) into ``shape``; 2D: ``out = (H, W, D)``, a volume
    whose axial slices fill ``(H, W)``."""
    inside = np.nonzero(_mni_tissue_labels_2mm())  # == the parcellation's support
    lo = np.array([a.min() for a in inside], np.float64)
    hi = np.array([a.max() for a in inside], np.float64)
    extent = (hi - lo + 1) * _BRAIN_MARGIN
    fit_axes = len(shape)
    scale = min(s / e for s, e in zip(shape, extent[:fit_axes]))  # output voxels per template voxel
    out_shape = list(shape) + ([int(math.ceil(extent[2] * scale))] if fit_axes == 2 else [])
    centre = (lo + hi) / 2
    ident = spatial.identity_grid(out_shape)
    out_centre = torch.tensor([(s - 1) / 2 for s in out_shape]).view(1, 3, 1, 1, 1)
    return torch.tensor(centre, dtype=torch.float32).view(1, 3, 1, 1, 1) + (ident - out_centre) / scale


@lru_cache(maxsize=8)
def _brain_on_grid(shape: tuple[int, ...], num_labels: int, seed: int) -> Tensor:
    """The parcellation fitted (isotropic scale, centred, nearest) into ``shape``: 3D ->
    ``(1, 1, *shape)``; 2D -> a volume ``(1, 1, H, W, D)`` whose axial slices fill ``(H, W)``."""
    parcels, _ = brain_parcellation(num_labels, seed)
    src = torch.from_numpy(parcels.astype(np.int64))[None, None]
    return spatial.sample(src, _brain_fit_coords(shape), "nearest", "zeros")


@lru_cache(maxsize=8)
def _t1_on_grid(shape: tuple[int, ...]) -> Tensor:
    """The MNI152 T1 (2 mm, [0, 1]) with the fit of :func:`_brain_on_grid`, linear: float32
    ``(1, 1, *shape)`` (3D) or ``(1, 1, H, W, D)`` (2D); voxel for voxel on the parcellation."""
    t1 = torch.from_numpy(np.array(mni152_template(2).array, dtype=np.float32))[None, None]
    return spatial.sample(t1, _brain_fit_coords(shape), "linear", "zeros").contiguous()


# --------------------------------------------------------------------------- intensities


def _lowres(images: Tensor, factors: Tensor) -> Tensor:
    """Down- (area) then up-sample (linear) each image by its per-axis ``factors`` (M, ndim)."""
    chosen = torch.nonzero((factors > 1).any(1)).flatten().tolist()
    if not chosen:
        return images
    out = images.clone()
    size = images.shape[2:]
    mode = "bilinear" if images.dim() == 4 else "trilinear"
    for i in chosen:
        small = [max(2, int(round(s / float(f)))) for s, f in zip(size, factors[i])]
        down = F.interpolate(images[i : i + 1], size=small, mode="area")
        out[i : i + 1] = F.interpolate(down, size=tuple(size), mode=mode, align_corners=False)
    return out


def random_mixture(
    m: int, num_labels: int, config: SynthConfig, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-image Gaussian mixture ``(means, stds)``, each ``(M, num_labels)``; the background
    (label 0) is dark with probability ``dark_background_prob``."""
    means = _uniform(config.mean_range, m * num_labels, generator, device).view(m, num_labels)
    stds = _uniform(config.std_range, m * num_labels, generator, device).view(m, num_labels)
    dark = (_uniform((0.0, 1.0), m, generator, device) < config.dark_background_prob).to(means.dtype)
    means[:, 0] *= 1 - dark
    stds[:, 0] *= 1 - dark
    return means, stds


def mixture_images(labels: Tensor, means: Tensor, stds: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian-mixture images ``(M, 1, *S)`` of label maps ``(M, 1, *S)``: per voxel
    ``means[m, label] + stds[m, label] * N(0, 1)`` (no augmentation)."""
    m, size = labels.shape[0], labels.shape[2:]
    flat = labels.reshape(m, -1)
    images = means.gather(1, flat) + stds.gather(1, flat) * _randn(flat.shape, generator, labels.device)
    return images.view(m, 1, *size)


def augment_intensities(images: Tensor, config: SynthConfig, generator: torch.Generator) -> Tensor:
    """Random per-image corruption of ``(M, 1, *S)`` images: Gaussian blur, multiplicative
    bias, additive noise, optional low resolution, min-max to [0, 1], gamma (see module doc).
    Returns float32 ``(M, 1, *S)`` in [0, 1]; all off (zero ranges) leaves only the min-max."""
    m, ndim, device = images.shape[0], images.dim() - 2, images.device
    size = images.shape[2:]
    images = gaussian_blur(images, _uniform(config.blur_sigma, m, generator, device))
    bias_shape = _coarse_size(size, config.bias_smoothness)
    log_bias = _randn((m, 1, *bias_shape), generator, device) * _view(
        _uniform((0.0, config.bias_strength), m, generator, device), ndim
    )
    images = images.clamp_min(0) * torch.exp(_interpolate(log_bias, size))
    images = images + _randn(images.shape, generator, device) * _view(
        _uniform((0.0, config.noise_std), m, generator, device), ndim
    )
    chosen = _uniform((0.0, 1.0), m, generator, device) < config.lowres_prob
    axes = _uniform((0.0, 1.0), m * ndim, generator, device).view(m, ndim) < 0.5
    axes[torch.arange(m, device=device), (_uniform((0.0, ndim), m, generator, device).long().clamp(max=ndim - 1))] = (
        True
    )
    factors = _uniform((1.0, config.lowres_factor), m * ndim, generator, device).view(m, ndim)
    factors = torch.where(axes & chosen[:, None], factors, torch.ones_like(factors))
    images = _lowres(images, factors.cpu())
    lo = images.flatten(1).amin(1)
    hi = images.flatten(1).amax(1)
    images = (images - _view(lo, ndim)) / _view((hi - lo).clamp_min(1e-6), ndim)
    gamma = torch.exp(config.gamma_std * _randn((m,), generator, device))
    return images.clamp(0.0, 1.0).pow(_view(gamma, ndim)).contiguous()


def synthesize_images(
    labels: Tensor,
    num_labels: int,
    config: SynthConfig,
    generator: torch.Generator,
    mixture: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One random image per label map ``(M, 1, *S)``: float32 ``(M, 1, *S)`` in [0, 1]
    (Gaussian mixture — drawn here unless ``mixture`` gives it —, then
    :func:`augment_intensities`; see module doc)."""
    m, device = labels.shape[0], labels.device
    means, stds = mixture if mixture is not None else random_mixture(m, num_labels, config, generator, device)
    return augment_intensities(mixture_images(labels, means, stds, generator), config, generator)


# --------------------------------------------------------------------------- generator


@dataclass
class SynthBatch:
    """A batch of synthetic pairs. Images ``(N, 1, *S)`` float32 in [0, 1]; labels
    ``(N, 1, *S)`` int64 in ``[0, num_labels)``; ``fixed_labels = warp(base_labels,
    fixed_field, nearest)`` (same for moving); fields ``(N, ndim, *S)`` in voxels.
    ``t1[i]``: pair ``i`` has T1 images, made from ``base_images[i]`` (the anatomy's T1,
    ``(N, 1, *S)`` float32, zero for the other pairs; None when no pair is T1) warped
    (linear) by the pair's fields, then augmented."""

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor
    moving_labels: Tensor
    num_labels: int
    base_labels: Tensor
    fixed_field: Tensor
    moving_field: Tensor
    sources: tuple[str, ...]
    base_images: Tensor | None = None
    t1: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return self.fixed.shape[0]


class SynthGenerator:
    """Draws :class:`SynthBatch` es from a :class:`SynthConfig`.

    ``label_maps``: integer arrays/tensors (spatial axes only) for the ``user`` source,
    relabelled jointly to consecutive labels and resampled (nearest) to ``config.shape``.
    The MNI parcellation (``brain`` source) is built and fitted once per process and cached.
    """

    def __init__(
        self,
        config: SynthConfig | None = None,
        label_maps: Sequence[np.ndarray | Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config if config is not None else SynthConfig()
        self.device = torch.device(device)
        cfg = self.config
        self.sources = tuple(s for s in SOURCES if cfg.sources.get(s, 0.0) > 0)
        self._weights = torch.tensor([cfg.sources[s] for s in self.sources], dtype=torch.float64)
        self._user, self.user_codes = None, None
        if "user" in self.sources and not label_maps:
            raise ValueError("sources['user'] > 0 needs label_maps (a list of integer label arrays)")
        if label_maps and "user" not in self.sources:
            raise ValueError("label_maps were given but sources has no 'user' weight > 0")
        if label_maps:
            self._user, self.user_codes = self._prepare_user(label_maps)
        self._brain: Tensor | None = None
        self._t1: Tensor | None = None
        self._default_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        counts = {
            "shapes": cfg.num_shape_labels,
            "brain": cfg.num_brain_labels,
            "user": 0 if self.user_codes is None else self.user_codes.numel(),
        }
        self.num_labels = max(counts[s] for s in self.sources)

    def _prepare_user(self, label_maps: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
        ndim = self.config.ndim
        maps = [_as_int64(m, f"label_maps[{i}]").cpu() for i, m in enumerate(label_maps)]
        for i, m in enumerate(maps):
            if m.dim() != ndim:
                raise ValueError(f"label_maps[{i}] has shape {tuple(m.shape)}; expected {ndim} spatial axes")
        codes = torch.unique(torch.cat([m.reshape(-1).unique() for m in maps]))
        out = []
        for m in maps:
            lab = relabel_consecutive(m, codes)[0][None, None].float()
            out.append(F.interpolate(lab, size=self.config.shape, mode="nearest").long())
        return torch.cat(out).to(self.device), codes

    def _brain_volume(self) -> Tensor:
        if self._brain is None:
            cfg = self.config
            self._brain = _brain_on_grid(cfg.shape, cfg.num_brain_labels, cfg.seed).to(self.device)
        return self._brain

    def _t1_volume(self) -> Tensor:
        if self._t1 is None:
            self._t1 = _t1_on_grid(self.config.shape).to(self.device)
        return self._t1

    def _brain_labels(
        self, n: int, generator: torch.Generator, t1: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """New anatomies: the fitted parcellation under a random per-axis scaling and warp;
        with a ``(n,)`` bool ``t1``, also the T1 of those anatomies (same slice, scaling and
        warp, linear; zero where ``t1`` is False), else None."""
        cfg, ndim, device = self.config, self.config.ndim, self.device
        volume = self._brain_volume()
        t1_volume = self._t1_volume() if t1 is not None else None
        if ndim == 2:
            depth = volume.shape[-1]
            pick = _uniform(_SLICE_BAND, n, generator, device).mul(depth - 1).round().long()
            base = volume[0, 0].permute(2, 0, 1)[pick].unsqueeze(1)  # (n, 1, H, W)
            t1_base = None if t1_volume is None else t1_volume[0, 0].permute(2, 0, 1)[pick].unsqueeze(1)
        else:
            base = volume.expand(n, -1, -1, -1, -1)
            t1_base = None if t1_volume is None else t1_volume.expand(n, -1, -1, -1, -1)
        scales = _uniform((1 - cfg.scale_range, 1 + cfg.scale_range), n * ndim, generator, device).view(n, ndim)
        warp_ = random_smooth_field(
            n,
            cfg.shape,
            _uniform(cfg.anatomy_displacement, n, generator, device),
            _uniform(cfg.anatomy_smoothness, n, generator, device).tolist(),
            generator,
            device=device,
            steps=cfg.integration_steps,
            downsample=cfg.integration_downsample,
        )
        ident = spatial.identity_grid(cfg.shape, device)
        centre = torch.tensor([(s - 1) / 2 for s in cfg.shape], device=device).view(1, ndim, *([1] * ndim))
        coords = centre + (ident - centre) / scales.view(n, ndim, *([1] * ndim)) + warp_
        labels = spatial.sample(base, coords, "nearest", "zeros")
        if t1 is None or t1_base is None:
            return labels, None
        images = torch.zeros(labels.shape, dtype=torch.float32, device=device)
        rows = torch.nonzero(t1.to(device)).flatten()
        if rows.numel():
            images[rows] = spatial.sample(t1_base[rows].contiguous(), coords[rows], "linear", "zeros")
        return labels, images

    def _user_labels(self, n: int, generator: torch.Generator) -> Tensor:
        assert self._user is not None
        pick = torch.randint(self._user.shape[0], (n,), generator=generator, device=generator.device)
        return self._user[pick.to(self.device)]

    def base_labels(self, sources: Sequence[str], generator: torch.Generator) -> Tensor:
        """One base label map per entry of ``sources``: ``(N, 1, *shape)`` int64."""
        return self._base(sources, generator, None)[0]

    def _base(
        self, sources: Sequence[str], generator: torch.Generator, t1: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Base label maps, and with a ``(N,)`` bool ``t1`` (True only for brain samples) the
        T1 anatomies ``(N, 1, *shape)`` float32 (zero elsewhere); else None."""
        cfg = self.config
        out = torch.empty((len(sources), 1, *cfg.shape), dtype=torch.int64, device=self.device)
        images = None if t1 is None else torch.zeros(out.shape, dtype=torch.float32, device=self.device)
        for name in self.sources:
            idx = [i for i, s in enumerate(sources) if s == name]
            if not idx:
                continue
            if name == "shapes":
                labels = random_shapes(
                    len(idx),
                    cfg.shape,
                    cfg.num_shape_labels,
                    generator,
                    smoothness=cfg.shape_smoothness,
                    warp=cfg.shape_warp,
                    downsample=cfg.label_downsample,
                    device=self.device,
                )
            elif name == "brain":
                labels, t1_images = self._brain_labels(len(idx), generator, None if t1 is None else t1[idx])
                if images is not None and t1_images is not None:
                    images[torch.tensor(idx, device=self.device)] = t1_images
            else:
                labels = self._user_labels(len(idx), generator)
            out[torch.tensor(idx, device=self.device)] = labels
        return out, images

    def _choose_sources(self, n: int, generator: torch.Generator) -> tuple[str, ...]:
        """One source name per sample, drawn with the configured weights."""
        if len(self.sources) == 1:
            return (self.sources[0],) * n
        cdf = self._weights.cumsum(0) / self._weights.sum()
        draws = torch.rand(n, generator=generator, device=generator.device).double().cpu()
        picks = torch.searchsorted(cdf, draws, right=True).clamp(max=len(self.sources) - 1)
        return tuple(self.sources[int(i)] for i in picks)

    def _choose_t1(self, names: Sequence[str], generator: torch.Generator) -> Tensor | None:
        """``(N,)`` bool on the CPU: which brain pairs get T1 images (probability ``t1_prob``);
        None (and no random draw) when no pair does."""
        if self.config.t1_prob <= 0 or "brain" not in names:
            return None
        draws = _uniform((0.0, 1.0), len(names), generator, torch.device("cpu"))
        t1 = (draws < self.config.t1_prob) & torch.tensor([s == "brain" for s in names])
        return t1 if bool(t1.any()) else None

    def _pair_mixture(self, names: Sequence[str], gen: torch.Generator) -> tuple[Tensor, Tensor] | None:
        """Gaussian mixtures of the 2N images (fixed first): brain parcels share their tissue's
        intensity with probability ``tissue_contrast`` (a realistic scan of a random contrast),
        and a pair shares one mixture with probability ``same_contrast`` (so an image
        similarity such as NCC is meaningful for it). None: independent draws as SynthMorph."""
        cfg, n, k = self.config, len(names), self.num_labels
        if cfg.same_contrast <= 0 and cfg.tissue_contrast <= 0:
            return None
        means, stds = random_mixture(2 * n, k, cfg, gen, self.device)
        if cfg.tissue_contrast > 0 and "brain" in names:
            tissue_of = torch.tensor(
                np.asarray(brain_parcellation(cfg.num_brain_labels, cfg.seed)[1]), dtype=torch.long
            )
            tissue_of = tissue_of.to(self.device)
            nb = tissue_of.numel()
            tissue_means, tissue_stds = random_mixture(2 * n, 4, cfg, gen, self.device)
            jitter = cfg.tissue_jitter * _randn((2 * n, nb), gen, self.device)
            use = _uniform((0.0, 1.0), 2 * n, gen, self.device) < cfg.tissue_contrast
            brain = torch.tensor([names[i % n] == "brain" for i in range(2 * n)], device=self.device)
            rows = torch.nonzero(use & brain).flatten()
            means[rows, :nb] = (tissue_means[rows][:, tissue_of] + jitter[rows]).clamp(0.0, 1.0)
            stds[rows, :nb] = tissue_stds[rows][:, tissue_of]
            means[rows, 0] = tissue_means[rows, 0]
            stds[rows, 0] = tissue_stds[rows, 0]
        if cfg.same_contrast > 0:
            same = torch.nonzero(_uniform((0.0, 1.0), n, gen, self.device) < cfg.same_contrast).flatten()
            means[n + same] = means[same]
            stds[n + same] = stds[same]
        return means, stds

    def sample(self, batch_size: int = 1, generator: torch.Generator | None = None) -> SynthBatch:
        """Draw ``batch_size`` pairs. Same ``generator`` state -> identical batch; without
        one, an internal generator seeded with ``config.seed`` is advanced."""
        batch_size = _check_int("batch_size", batch_size, 1, 4096)
        gen = generator if generator is not None else self._default_generator
        cfg, n = self.config, batch_size
        names = self._choose_sources(n, gen)
        t1 = self._choose_t1(names, gen)
        base, base_images = self._base(names, gen, t1)
        mags = cfg.difficulty * _uniform(cfg.max_displacement, 2 * n, gen, self.device)
        fields_ = random_smooth_field(
            2 * n,
            cfg.shape,
            mags,
            _uniform(cfg.smoothness, 2 * n, gen, self.device).tolist(),
            gen,
            device=self.device,
            steps=cfg.integration_steps,
            downsample=cfg.integration_downsample,
        )
        labels = _warp_labels(base.repeat(2, *([1] * (base.dim() - 1))), fields_)
        mixture = self._pair_mixture(names, gen)
        if t1 is None:
            images = synthesize_images(labels, self.num_labels, cfg, gen, mixture)
        else:  # T1 pairs: the anatomy's T1 warped (linear) by each field instead of the mixture
            assert base_images is not None
            means, stds = (
                mixture if mixture is not None else random_mixture(2 * n, self.num_labels, cfg, gen, self.device)
            )
            images = torch.empty(labels.shape, dtype=torch.float32, device=self.device)
            both = t1.repeat(2).to(self.device)
            rows, other = torch.nonzero(both).flatten(), torch.nonzero(~both).flatten()
            if other.numel():
                images[other] = mixture_images(labels[other], means[other], stds[other], gen)
            images[rows] = _warp_images(base_images.repeat(2, *([1] * (base.dim() - 1)))[rows], fields_[rows])
            images = augment_intensities(images, cfg, gen)
        return SynthBatch(
            fixed=images[:n],
            moving=images[n:],
            fixed_labels=labels[:n],
            moving_labels=labels[n:],
            num_labels=self.num_labels,
            base_labels=base,
            fixed_field=fields_[:n],
            moving_field=fields_[n:],
            sources=names,
            base_images=base_images,
            t1=tuple(bool(v) for v in t1) if t1 is not None else (False,) * n,
        )
