"""Unsupervised VoxelMorph training: one loop for every mode.

Loss per step (moving ``M``, fixed ``F``, predicted displacement ``u``)::

    similarity(F, warp(M, u)) + lambda * regularizer(u) [+ dice_weight * DiceLoss(labels)]

``lambda`` is fixed (``TrainConfig.lam``) or, for a lambda-conditional network
(``TrainConfig.lam_range``), drawn log-uniformly per sample and fed to the network.
Data come from a :class:`TrainingSet`: every scan loaded once, normalised to [0, 1],
resampled onto one grid and cached as one float32 tensor ``(N, 1, *S)``; pairs are drawn
from a seeded ``torch.Generator``. :func:`train` writes ``metrics.csv``, ``loss_curve.png``,
``last.pt`` (every ``checkpoint_every`` steps, at the end and on SIGTERM/Ctrl-C) and
``best.pt`` (best validation Dice, or validation loss without labels) to ``output_dir``.
``resume=True`` restores model, optimiser, RNG states and step from ``last.pt`` so that a
continued run gives the same weights as an uninterrupted one (on the same device).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import io
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.losses import DiceLoss, regularizer, similarity_loss
from voxreg.nn import NetworkConfig, VoxelMorph, config_kwargs, load_checkpoint, save_checkpoint
from voxreg.core.runtime import configure_allocator

__all__ = ["TrainConfig", "TrainingSet", "TrainResult", "TrainingInterrupted", "train", "validate", "augment",
           "METRIC_COLUMNS"]

METRIC_COLUMNS = ("step", "loss", "similarity", "regularizer", "lambda", "lr", "scale", "seconds",
                  "val_dice", "val_loss")
_PRESETS = {"vm1": NetworkConfig.vm1, "vm2": NetworkConfig.vm2}
_DEVICES = ("auto", "cpu", "cuda")
#: config fields that may change between a run and its resumed continuation
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "validate_every", "device", "tensorboard",
                      "grad_checkpoint", "amp"}
_VAL_PAIRS = 8


# --------------------------------------------------------------------------- config


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (defaults: VoxelMorph-2, NCC 9, lambda 1).

    ``lam_range=(low, high)`` trains a lambda-conditional network (lambda log-uniform in
    the range per sample); ``lam`` is then only the default for validation-free uses.
    ``dice_weight > 0`` adds a Dice loss on warped one-hot labels (semi-supervised) for
    pairs where both scans have label maps. ``bidirectional`` (diffeomorphic networks only,
    ``int_steps > 0``) also scores the fixed scan warped back by the inverse field
    (integrated negative velocity). ``schedule`` is a coarse-to-fine resolution schedule:
    ``((scale, steps), ...)`` trains ``steps`` steps on the grid resized by ``scale`` (e.g.
    0.5) before the next stage; the remaining steps run at full resolution. The network
    is fully convolutional, so the same weights and optimiser state carry on unchanged.
    ``lr_schedule`` is ``constant`` or ``cosine`` (decay to 0 at ``steps``). ``amp`` runs the
    U-Net in bfloat16 (float16 + gradient scaling where bf16 is unsupported) on CUDA; on
    CPU it is ignored. ``grad_checkpoint`` recomputes U-Net activations in the backward pass
    (less memory, ~30 % more time). ``tensorboard`` also logs to ``output_dir/tensorboard``.
    """

    similarity: str = "ncc"
    window: int = 9
    lam: float = 1.0
    lam_range: tuple[float, float] | None = None
    regularizer: str = "l2"
    network: str = "vm2"
    half_res: bool = False
    int_steps: int = 0
    lr: float = 1e-4
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 100
    device: str = "auto"
    dice_weight: float = 0.0
    augment: bool = False
    bidirectional: bool = False
    schedule: tuple[tuple[float, int], ...] = ()
    lr_schedule: str = "constant"
    amp: bool = False
    grad_checkpoint: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _check_choice("similarity", self.similarity, ("ncc", "mse", "mi"))
        _check_int("window", self.window, 1)
        _check_positive("lam", self.lam, allow_zero=True)
        if self.lam_range is not None:
            if isinstance(self.lam_range, (str, bytes)) or not isinstance(self.lam_range, Sequence) \
                    or len(self.lam_range) != 2:
                raise ValueError(f"lam_range must be (low, high) or None, got {self.lam_range!r}")
            low, high = self.lam_range
            _check_positive("lam_range[0]", low)
            _check_positive("lam_range[1]", high)
            if not low < high:
                raise ValueError(f"lam_range must have low < high, got {tuple(self.lam_range)}")
            self.lam_range = (float(low), float(high))
        _check_choice("regularizer", self.regularizer, ("l2", "l1", "bending"))
        _check_choice("network", self.network, tuple(_PRESETS))
        if not isinstance(self.half_res, bool):
            raise ValueError(f"half_res must be True or False, got {self.half_res!r}")
        _check_int("int_steps", self.int_steps, 0)
        if self.int_steps > 20:
            raise ValueError(f"int_steps must be in [0, 20], got {self.int_steps}")
        _check_positive("lr", self.lr)
        for name in ("steps", "batch_size", "checkpoint_every", "validate_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_choice("device", self.device, _DEVICES)
        _check_positive("dice_weight", self.dice_weight, allow_zero=True)
        for name in ("augment", "bidirectional", "amp", "grad_checkpoint", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bidirectional and self.int_steps == 0:
            raise ValueError("bidirectional training needs a diffeomorphic network (int_steps > 0)")
        _check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        self.schedule = _check_schedule(self.schedule)

    @property
    def lambda_conditional(self) -> bool:
        """True when the network takes lambda as an input (``lam_range`` set)."""
        return self.lam_range is not None

    @property
    def validation_lambda(self) -> float:
        """Lambda used for validation: ``lam``, or the geometric mean of ``lam_range``."""
        if self.lam_range is None:
            return float(self.lam)
        return math.sqrt(self.lam_range[0] * self.lam_range[1])

    def network_config(self, ndim: int) -> NetworkConfig:
        """The :class:`NetworkConfig` this training config builds for ``ndim`` spatial dims."""
        return _PRESETS[self.network](ndim=ndim, int_steps=self.int_steps, half_res=self.half_res,
                                      lambda_conditional=self.lambda_conditional)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON- and checkpoint-safe)."""
        out = asdict(self)
        out["lam_range"] = list(self.lam_range) if self.lam_range is not None else None
        out["schedule"] = [list(stage) for stage in self.schedule]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        data = config_kwargs(cls, data, "train")
        if data.get("lam_range") is not None:
            data["lam_range"] = tuple(data["lam_range"])
        if data.get("schedule") is not None:
            data["schedule"] = tuple(tuple(stage) for stage in data["schedule"])
        return cls(**data)

    def stage_scale(self, step: int) -> float:
        """Grid scale used for training step ``step`` (0-based) under :attr:`schedule`."""
        end = 0
        for scale, steps in self.schedule:
            end += steps
            if step < end:
                return scale
        return 1.0


def _check_schedule(schedule: Any) -> tuple[tuple[float, int], ...]:
    """Validate a resolution schedule ``((scale, steps), ...)`` with 0 < scale < 1."""
    if schedule is None:
        return ()
    try:
        stages = tuple((float(scale), steps) for scale, steps in schedule)
    except (TypeError, ValueError):
        raise ValueError(f"schedule must be a list of (scale, steps) pairs, got {schedule!r}") from None
    for scale, steps in stages:
        if not 0 < scale < 1:
            raise ValueError(f"schedule scales must be in (0, 1), got {scale}")
        _check_int("schedule steps", steps, 1)
    return tuple((scale, int(steps)) for scale, steps in stages)


# --------------------------------------------------------------------------- data


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

    def __post_init__(self) -> None:
        if self.images.dim() not in (4, 5) or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, *spatial), got {tuple(self.images.shape)}")
        if len(self) < 2:
            raise VoxregError(f"training needs at least 2 scans (or 1 scan and an atlas), got {len(self)}")
        self.images = self.images.float().contiguous()
        if self.labels is not None:
            if self.labels.shape != self.images.shape:
                raise ValueError(f"labels {tuple(self.labels.shape)} must match images "
                                 f"{tuple(self.images.shape)}")
            self.labels = self.labels.long()
            if self.has_labels is None:
                self.has_labels = torch.ones(len(self), dtype=torch.bool)
        self.has_labels = (self.has_labels.bool() if self.has_labels is not None
                           else torch.zeros(len(self), dtype=torch.bool))

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
    def from_images(cls, scans: Sequence[Image], labels: Sequence[Image | None] | None = None,
                    shape: Sequence[int] | None = None, atlas: Image | None = None,
                    atlas_labels: Image | None = None) -> "TrainingSet":
        """Normalise each scan to [0, 1] and resample scans (linear) and labels (nearest)
        onto the first scan's grid (the atlas grid when ``atlas`` is given) in world space,
        then onto ``shape`` when given."""
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
        target = tuple(int(s) for s in shape) if shape is not None else ref.shape
        if len(target) != ref.ndim or min(target) < 2:
            raise VoxregError(f"shape {target} does not fit {ref.ndim}D scans")
        images, label_list, has = [], [], []
        for i, scan in enumerate(scans):
            norm = scan.with_array(io.normalize_intensity(scan.array))
            images.append(_resize(_grid_tensor(norm, ref), target, nearest=False))
            lab = labels[i] if labels is not None else None
            has.append(lab is not None)
            label_list.append(_resize(_grid_tensor(io.as_label_image(lab), ref), target, True)
                              if lab is not None else torch.zeros(1, 1, *target))
        affine = _scaled_affine(ref, target)
        return cls(torch.cat(images), torch.cat(label_list).long() if any(has) else None,
                   torch.tensor(has), affine, atlas=atlas is not None)

    @classmethod
    def from_paths(cls, scans: Sequence[str | os.PathLike[str]],
                   labels: Sequence[str | os.PathLike[str] | None] | None = None,
                   shape: Sequence[int] | None = None,
                   cache: str | os.PathLike[str] | None = None,
                   atlas: str | os.PathLike[str] | None = None,
                   atlas_labels: str | os.PathLike[str] | None = None) -> "TrainingSet":
        """Load every scan (and label map, atlas) once; reuse/write the ``.pt`` ``cache`` when
        given (it is rebuilt when the file list or shape differ)."""
        key = _cache_key([*scans, *([atlas] if atlas else [])],
                         [*labels, atlas_labels] if labels is not None and atlas else labels, shape)
        if cache is not None and Path(cache).is_file():
            found = cls.load(cache)
            if found[1] == key:
                return found[0]
        images = [io.load_image(p) for p in scans]
        label_images = ([io.load_image(p, label=True) if p is not None else None for p in labels]
                        if labels is not None else None)
        atlas_image = io.load_image(atlas) if atlas is not None else None
        atlas_label_image = io.load_image(atlas_labels, label=True) if atlas_labels is not None else None
        out = cls.from_images(images, label_images, shape, atlas_image, atlas_label_image)
        if cache is not None:
            out.save(cache, key)
        return out

    def save(self, path: str | os.PathLike[str], key: str = "") -> Path:
        """Write the cached tensors to a ``.pt`` file atomically."""
        payload = {"images": self.images, "labels": self.labels, "has_labels": self.has_labels,
                   "affine": torch.from_numpy(np.asarray(self.affine, dtype=np.float64)), "key": key,
                   "atlas": self.atlas}
        with io.atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple["TrainingSet", str]:
        """Read a cache written by :meth:`save`: ``(training set, key)``."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(data["images"], data["labels"], data["has_labels"], data["affine"].numpy(),
                       bool(data.get("atlas", False))), str(data.get("key", ""))
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is a user error
            raise VoxregError(f"cannot read training cache {path}: {exc}") from exc

    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random (moving, fixed) index pairs of distinct scans (scan -> atlas in atlas
        mode), each ``(batch_size,)``."""
        n = len(self)
        if self.atlas:
            moving = torch.randint(0, n - 1, (batch_size,), generator=generator)
            return moving, torch.full_like(moving, n - 1)
        moving = torch.randint(0, n, (batch_size,), generator=generator)
        offset = torch.randint(1, n, (batch_size,), generator=generator)
        return moving, (moving + offset) % n

    def validation_pairs(self) -> list[tuple[int, int]]:
        """Deterministic pairs ``(i, i+1)`` (``(i, atlas)`` in atlas mode; at most 8) used
        for validation."""
        n = len(self)
        if self.atlas:
            return [(i, n - 1) for i in range(min(n - 1, _VAL_PAIRS))]
        return [(i, (i + 1) % n) for i in range(min(n, _VAL_PAIRS))]


    def resized(self, scale: float) -> "TrainingSet":
        """A copy on a grid ``scale`` times the size (area-averaged images, nearest labels;
        voxel centres follow the half-voxel convention, and so does the new affine)."""
        shape = tuple(max(4, round(s * scale)) for s in self.shape)
        images = F.interpolate(self.images, size=shape, mode="area")
        labels = (F.interpolate(self.labels.float(), size=shape, mode="nearest-exact").long()
                  if self.labels is not None else None)
        ratio = np.array([old / new for old, new in zip(self.shape, shape)])
        step = np.eye(4)
        step[:3, :3] = np.diag(np.pad(ratio, (0, 3 - len(ratio)), constant_values=1.0))
        step[:len(ratio), 3] = 0.5 * ratio - 0.5
        affine = np.asarray(self.affine, dtype=np.float64) @ step
        return TrainingSet(images, labels, self.has_labels, affine, self.atlas)


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
    parts = [str(Path(p).resolve()) for p in scans]
    parts += ["labels:"] + ([str(Path(p).resolve()) if p is not None else "-" for p in labels]
                            if labels is not None else [])
    return "|".join(parts + [f"shape:{tuple(shape) if shape is not None else None}"])


# --------------------------------------------------------------------------- augmentation


def _random_affine(ndim: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Small voxel-space affine about the centre: rotation <= 5 deg, scale +-5 %, shift <= 2 vox."""
    u = lambda *s: torch.rand(*s, generator=generator) * 2 - 1  # noqa: E731
    n_rot = 3 if ndim == 3 else 1
    angles = u(n_rot) * math.radians(5)
    rot = torch.eye(ndim, dtype=torch.float64)
    planes = [(0, 1), (0, 2), (1, 2)][:n_rot]
    for (a, b), t in zip(planes, angles.double()):
        r = torch.eye(ndim, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = t.cos(), -t.sin(), t.sin(), t.cos()
        rot = r @ rot
    linear = rot @ torch.diag(1 + 0.05 * u(ndim).double())
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    matrix = torch.eye(ndim + 1, dtype=torch.float64)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre - linear @ centre + 2.0 * u(ndim).double()
    return matrix.float()


def augment(images: Tensor, labels: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Random small affine (linear for images, nearest for labels; no flips) and intensity
    change (gamma in [0.8, 1.25], contrast +-10 %, brightness +-0.05, clipped to [0, 1])."""
    ndim, shape = images.dim() - 2, images.shape[2:]
    fields_ = torch.cat([spatial.matrix_to_field(_random_affine(ndim, shape, generator), shape)
                         for _ in range(images.shape[0])]).to(images.device)
    out = spatial.warp(images, fields_)
    n = images.shape[0]
    view = (n,) + (1,) * (ndim + 1)
    gamma = torch.exp(torch.empty(n).uniform_(math.log(0.8), math.log(1.25), generator=generator))
    contrast = 1 + 0.1 * (torch.rand(n, generator=generator) * 2 - 1)
    bright = 0.05 * (torch.rand(n, generator=generator) * 2 - 1)
    dev = images.device
    out = out.clamp(0, 1).pow(gamma.to(dev).view(view)) * contrast.to(dev).view(view) + bright.to(dev).view(view)
    warped_labels = spatial.warp(labels, fields_, mode="nearest") if labels is not None else None
    return out.clamp(0, 1), warped_labels


# --------------------------------------------------------------------------- losses


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(N, 1, *S)`` int labels -> ``(N, K, *S)`` float one-hot."""
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()


def _label_dice(fixed: Tensor, warped: Tensor) -> float:
    """Mean Dice over the non-zero labels present in ``fixed`` (``(1, 1, *S)`` int tensors)."""
    scores = []
    for k in torch.unique(fixed).tolist():
        if k == 0:
            continue
        a, b = fixed == k, warped == k
        scores.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return float(np.mean(scores)) if scores else float("nan")


class _Objective:
    """The training loss; returns ``(total, similarity, regularizer)``."""

    def __init__(self, config: TrainConfig, num_classes: int) -> None:
        kwargs = {"window": config.window} if config.similarity == "ncc" else {}
        self.similarity = similarity_loss(config.similarity, **kwargs)
        self.regularizer = regularizer(config.regularizer)
        self.dice = DiceLoss()
        self.dice_weight = config.dice_weight if num_classes > 1 else 0.0
        self.num_classes = num_classes

    def __call__(self, moving: Tensor, fixed: Tensor, field_: Tensor, lam: Tensor,
                 labels: tuple[Tensor, Tensor, Tensor] | None = None,
                 inverse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        sim = self.similarity(fixed, spatial.warp(moving, field_))
        if inverse is not None:  # bidirectional: fixed warped back onto moving, weights 1/2 each
            sim = 0.5 * (sim + self.similarity(moving, spatial.warp(fixed, inverse)))
        regs = torch.stack([self.regularizer(field_[i:i + 1]) for i in range(field_.shape[0])])
        reg_term = (lam.to(regs) * regs).mean()
        total = sim + reg_term
        if labels is not None and self.dice_weight > 0:
            mov_lab, fix_lab, both = labels
            if bool(both.any()):
                warped = spatial.warp(_one_hot(mov_lab[both], self.num_classes), field_[both])
                target = _one_hot(fix_lab[both], self.num_classes)
                total = total + self.dice_weight * self.dice(target[:, 1:], warped[:, 1:])
        return total, sim, regs.mean()


# --------------------------------------------------------------------------- outputs


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (eval mode), the last step and paths."""

    model: VoxelMorph
    step: int
    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics_csv: Path
    loss_plot: Path
    best_metric: float | None
    history: list[dict[str, float]]


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after SIGTERM/SIGINT stopped training; ``last.pt`` holds the last step."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"training stopped by signal {signum} at step {step}; resume from {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    with io.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(history)


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    with open(path, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, restval="").writerow(row)


def _read_metrics(path: Path, upto: int) -> list[dict[str, float]]:
    """Rows of an existing metrics.csv with ``step <= upto`` (for resume)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
    for row in rows:
        row["step"] = int(row["step"])
    return [r for r in rows if r["step"] <= upto]


def _plot_losses(path: Path, history: list[dict[str, float]]) -> None:
    """Loss curves (total, similarity, regulariser) and validation Dice, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in history]
    for key in ("loss", "similarity", "regularizer"):
        ax.plot(steps, [r[key] for r in history], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [(r["step"], r["val_dice"]) for r in history if "val_dice" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "k.-", label="val Dice")
        ax2.set_ylabel("validation Dice")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if val else "best")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


# --------------------------------------------------------------------------- loop helpers


def _sample_lambda(config: TrainConfig, n: int, generator: torch.Generator) -> Tensor:
    if config.lam_range is None:
        return torch.full((n,), float(config.lam))
    low, high = (math.log(v) for v in config.lam_range)
    return torch.exp(torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low).float()


def _batch(data: TrainingSet, config: TrainConfig, generator: torch.Generator,
           device: torch.device) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """One training batch: moving, fixed, lambda per sample, optional (labels, labels, mask)."""
    mi, fi = data.sample_pairs(config.batch_size, generator)
    lam = _sample_lambda(config, config.batch_size, generator)
    moving, fixed = data.images[mi], data.images[fi]
    use_labels = data.labels is not None and config.dice_weight > 0
    mov_lab = data.labels[mi] if use_labels else None
    fix_lab = data.labels[fi] if use_labels else None
    if config.augment:
        moving, mov_lab = augment(moving, mov_lab, generator)
        fixed, fix_lab = augment(fixed, fix_lab, generator)
    labels = None
    if use_labels:
        both = (data.has_labels[mi] & data.has_labels[fi]).to(device)
        labels = (mov_lab.to(device), fix_lab.to(device), both)
    return moving.to(device), fixed.to(device), lam.to(device), labels


@torch.no_grad()
def validate(model: VoxelMorph, data: TrainingSet, config: TrainConfig,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss (and mean Dice of warped labels when labelled) over the validation pairs."""
    objective = _Objective(config, data.num_classes)
    lam_value = config.validation_lambda
    was_training = model.training
    model.eval()
    losses, dices = [], []
    for m, f in data.validation_pairs():
        moving, fixed = data.images[m:m + 1].to(device), data.images[f:f + 1].to(device)
        lam = torch.full((1,), lam_value, device=device)
        field_ = model(moving, fixed, lam if config.lambda_conditional else None).field
        losses.append(float(objective(moving, fixed, field_, lam)[0]))
        if data.labels is not None and bool(data.has_labels[m] & data.has_labels[f]):
            warped = spatial.warp(data.labels[m:m + 1].to(device).float(), field_, mode="nearest")
            dices.append(_label_dice(data.labels[f:f + 1].to(device), warped.long()))
    model.train(was_training)
    out = {"val_loss": float(np.mean(losses))}
    if dices:
        out["val_dice"] = float(np.nanmean(dices))
    return out


@dataclass
class _Dist:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    owner: bool = False  # this call initialised the process group (and tears it down)

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and validates."""
        return self.rank == 0


def _init_distributed(config: TrainConfig) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPU,
    NCCL on CUDA (one GPU per local rank). Returns the rank info and this rank's device."""
    from voxreg.core.runtime import resolve_device

    device = resolve_device(config.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return _Dist(rank, world, owner), device


def _any_rank(flag: bool, ctx: _Dist, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (so that every rank stops at the same step)."""
    if ctx.world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _gather_rng(generator: torch.Generator, ctx: _Dist) -> list[Tensor]:
    """Every rank's data-sampling RNG state (collective call under DDP)."""
    state = generator.get_state()
    if ctx.world == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world
    dist.all_gather_object(states, state)
    return states


@dataclass
class _Session:
    """What the loop updates and a checkpoint stores."""

    model: VoxelMorph  # the bare network (checkpoints, validation)
    net: torch.nn.Module  # what the training forward calls (the DDP wrapper under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    scaler: Any = None
    step: int = 0
    best: float | None = None
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_factor(config: TrainConfig) -> Callable[[int], float]:
    if config.lr_schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 (or float16 where bf16 is unsupported) for ``amp`` on CUDA; None otherwise."""
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _new_session(config: TrainConfig, ndim: int, device: torch.device, ctx: _Dist) -> _Session:
    torch.manual_seed(config.seed)
    model = VoxelMorph(config.network_config(ndim)).to(device)
    model.grad_checkpoint = config.grad_checkpoint
    net: torch.nn.Module = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * ctx.rank)
    scaler = torch.amp.GradScaler("cuda") if _amp_dtype(config, device) == torch.float16 else None
    return _Session(model, net, optimizer, scheduler, generator, scaler)


def _save(path: Path, session: _Session, config: TrainConfig, rngs: list[Tensor]) -> Path:
    extra = {"train_config": config.to_dict(), "step": session.step, "optimizer": session.optimizer.state_dict(),
             "scheduler": session.scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
             "torch_rng": torch.get_rng_state(), "best_metric": session.best, "seconds": session.seconds}
    if session.scaler is not None:
        extra["scaler"] = session.scaler.state_dict()
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    return save_checkpoint(path, session.model, extra)


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    old = TrainConfig.from_dict(saved).to_dict()
    new = config.to_dict()
    changed = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        raise VoxregError(f"cannot resume from {path}: config differs in {changed} "
                          f"(only {sorted(_RESUMABLE_CHANGES)} may change)")


def _restore(path: Path, session: _Session, config: TrainConfig, device: torch.device,
             metrics_path: Path, ctx: _Dist) -> None:
    """Load ``last.pt`` into model, optimiser, scheduler, scaler, RNGs, step and history."""
    loaded, extra = load_checkpoint(path, device)
    _check_resume_config(extra.get("train_config", {}), config, path)
    if loaded.config != session.model.config:
        raise VoxregError(f"cannot resume from {path}: its network differs from the config")
    session.model.load_state_dict(loaded.state_dict())
    session.optimizer.load_state_dict(extra["optimizer"])
    if "scheduler" in extra:
        session.scheduler.load_state_dict(extra["scheduler"])
    if session.scaler is not None and "scaler" in extra:
        session.scaler.load_state_dict(extra["scaler"])
    rngs = extra.get("rng_ranks") or [extra["rng"]]
    if ctx.rank < len(rngs):
        session.generator.set_state(rngs[ctx.rank].cpu())
    else:  # more ranks than when saved: a fresh, distinct stream for the new rank
        session.generator.manual_seed(config.seed + 1_000_003 * ctx.rank + int(extra["step"]))
    torch.set_rng_state(extra["torch_rng"].cpu())
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
    session.step, session.best = int(extra["step"]), extra.get("best_metric")
    session.seconds = float(extra.get("seconds", 0.0))
    session.history = _read_metrics(metrics_path, session.step)


class _StopSignals:
    """Turn SIGTERM/SIGINT into a flag while training (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _better(value: float, best: float | None, higher: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher else value < best)


def _tensorboard(config: TrainConfig, out: Path, ctx: _Dist) -> Any:
    """A TensorBoard SummaryWriter in ``out/tensorboard`` (rank 0, ``config.tensorboard``)."""
    if not config.tensorboard or not ctx.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VoxregError("--tensorboard needs the tensorboard package: "
                          "pip install 'voxreg[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


# --------------------------------------------------------------------------- train


def _train_step(session: _Session, config: TrainConfig, data: TrainingSet, objective: _Objective,
                device: torch.device) -> dict[str, float]:
    """One optimiser step on one batch; returns the loss terms."""
    moving, fixed, lam, labels = _batch(data, config, session.generator, device)
    dtype = _amp_dtype(config, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        output = session.net(moving, fixed, lam if config.lambda_conditional else None)
    inverse = None
    if config.bidirectional:
        inverse = spatial.integrate_velocity(-output.velocity.float(), config.int_steps)
    loss, sim, reg = objective(moving, fixed, output.field.float(), lam, labels, inverse)
    session.optimizer.zero_grad(set_to_none=True)
    if session.scaler is not None:
        session.scaler.scale(loss).backward()
        session.scaler.step(session.optimizer)
        session.scaler.update()
    else:
        loss.backward()
        session.optimizer.step()
    lr = session.optimizer.param_groups[0]["lr"]
    session.scheduler.step()
    return {"loss": float(loss.detach()), "similarity": float(sim.detach()),
            "regularizer": float(reg.detach()), "lambda": float(lam.mean()), "lr": lr}


def _check_inputs(config: Any, training_set: Any, validation_set: Any) -> None:
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(training_set, TrainingSet):
        raise ValueError(f"training_set must be a TrainingSet, got {type(training_set).__name__}")
    if validation_set is not None and validation_set.ndim != training_set.ndim:
        raise VoxregError("validation_set and training_set must have the same dimensionality")


def train(config: TrainConfig, training_set: TrainingSet, output_dir: str | os.PathLike[str],
          validation_set: TrainingSet | None = None, resume: bool = False,
          progress: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a VoxelMorph network unsupervised (see the module docstring).

    ``progress(step, row)`` is called after every step with the metrics row. With
    ``resume=True`` training continues from ``output_dir/last.pt`` up to ``config.steps``.
    SIGTERM/SIGINT stop after the current step, save ``last.pt`` and raise
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). Launched by ``torchrun`` with
    several processes, training runs DistributedDataParallel (each rank draws its own
    pairs; gradients are averaged; rank 0 validates and writes the outputs).
    """
    _check_inputs(config, training_set, validation_set)
    configure_allocator()
    ctx, device = _init_distributed(config)
    try:
        result = _run(config, training_set, io.ensure_output_dir(output_dir), validation_set, resume,
                      progress, ctx, device)
        if ctx.world > 1:  # every rank done (rank 0 writes last) before the group is torn down
            import torch.distributed as dist

            dist.barrier()
        return result
    finally:
        if ctx.owner:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(config: TrainConfig, training_set: TrainingSet, out: Path, validation_set: TrainingSet | None,
         resume: bool, progress: Callable[[int, dict[str, float]], None] | None, ctx: _Dist,
         device: torch.device) -> TrainResult:
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, plot_path = out / "metrics.csv", out / "loss_curve.png"
    session = _new_session(config, training_set.ndim, device, ctx)
    if resume:
        _restore(last_path, session, config, device, metrics_path, ctx)
    writer = _tensorboard(config, out, ctx)
    if ctx.main:
        _write_metrics(metrics_path, session.history)
    objective = _Objective(config, training_set.num_classes)
    higher = validation_set is not None and validation_set.labels is not None
    stages: dict[float, TrainingSet] = {1.0: training_set}
    session.net.train()
    start, offset = time.perf_counter(), session.seconds
    with _StopSignals() as stop:
        while session.step < config.steps:
            scale = config.stage_scale(session.step)
            if scale not in stages:
                stages[scale] = training_set.resized(scale)
            row = _train_step(session, config, stages[scale], objective, device)
            session.step += 1
            session.seconds = offset + time.perf_counter() - start
            row.update(step=session.step, scale=scale, seconds=session.seconds)
            if ctx.main and validation_set is not None and (
                    session.step % config.validate_every == 0 or session.step == config.steps):
                row.update(validate(session.model, validation_set, config, device))
                metric = row.get("val_dice", row["val_loss"])
                if _better(metric, session.best, higher):
                    session.best = metric
                    _save(best_path, session, config, [session.generator.get_state()])
            if ctx.main:
                _record(row, session, metrics_path, writer, progress)
            stopping = _any_rank(stop.signum is not None, ctx, device)
            if session.step % config.checkpoint_every == 0 or session.step == config.steps or stopping:
                rngs = _gather_rng(session.generator, ctx)
                if ctx.main:
                    _save(last_path, session, config, rngs)
                    _plot_losses(plot_path, session.history)
            if stopping:
                raise TrainingInterrupted(session.step, last_path, stop.signum or signal.SIGTERM)
    if writer is not None:
        writer.close()
    if ctx.main and not last_path.exists():  # resumed a run that had already finished
        _save(last_path, session, config, _gather_rng(session.generator, ctx))
    if ctx.main and not plot_path.exists() and session.history:
        _plot_losses(plot_path, session.history)
    return TrainResult(session.model.eval(), session.step, out, last_path,
                       best_path if best_path.exists() else None, metrics_path, plot_path, session.best,
                       session.history)


def _record(row: dict[str, float], session: _Session, metrics_path: Path, writer: Any,
            progress: Callable[[int, dict[str, float]], None] | None) -> None:
    """Append the step's row to the history, metrics.csv, TensorBoard and the progress callback."""
    session.history.append(row)
    _append_metrics(metrics_path, row)
    if writer is not None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])
    if progress is not None:
        progress(row["step"], row)


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
    if not path.exists():
        raise VoxregError(f"{path}: file not found")
    rows = []
    with path.open(newline="") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().lower() in ("", "scan", "image", "path") or row[0].startswith("#"):
                continue
            scan = (path.parent / row[0].strip()).resolve()
            label = (path.parent / row[1].strip()).resolve() if len(row) > 1 and row[1].strip() else None
            rows.append((scan, label))
    return rows
