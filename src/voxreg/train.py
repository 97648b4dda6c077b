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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import io, spatial
from .errors import VoxregError
from .image import Image
from .losses import DiceLoss, regularizer, similarity_loss
from .networks import NetworkConfig, VoxelMorph, config_kwargs, load_checkpoint, save_checkpoint
from .runtime import configure_allocator

__all__ = ["TrainConfig", "TrainingSet", "TrainResult", "TrainingInterrupted", "train", "validate", "augment",
           "METRIC_COLUMNS"]

METRIC_COLUMNS = ("step", "loss", "similarity", "regularizer", "lambda", "val_dice", "val_loss")
_PRESETS = {"vm1": NetworkConfig.vm1, "vm2": NetworkConfig.vm2}
_DEVICES = ("auto", "cpu", "cuda")
#: config fields that may change between a run and its resumed continuation
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "validate_every", "device"}
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
    pairs where both scans have label maps.
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
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be True or False, got {self.augment!r}")

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
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        data = config_kwargs(cls, data, "train")
        if data.get("lam_range") is not None:
            data["lam_range"] = tuple(data["lam_range"])
        return cls(**data)


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
    ``(N, 1, *S)`` or None; ``has_labels`` bool ``(N,)``; ``affine`` of the common grid."""

    images: Tensor
    labels: Tensor | None = None
    has_labels: Tensor | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        if self.images.dim() not in (4, 5) or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, *spatial), got {tuple(self.images.shape)}")
        if len(self) < 2:
            raise VoxregError(f"training needs at least 2 scans, got {len(self)}")
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
                    shape: Sequence[int] | None = None) -> "TrainingSet":
        """Normalise each scan to [0, 1] and resample scans (linear) and labels (nearest)
        onto the first scan's grid in world space, then onto ``shape`` when given."""
        if len(scans) < 2:
            raise VoxregError(f"training needs at least 2 scans, got {len(scans)}")
        if labels is not None and len(labels) != len(scans):
            raise VoxregError(f"got {len(labels)} label maps for {len(scans)} scans")
        ref = scans[0]
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
                   torch.tensor(has), affine)

    @classmethod
    def from_paths(cls, scans: Sequence[str | os.PathLike[str]],
                   labels: Sequence[str | os.PathLike[str] | None] | None = None,
                   shape: Sequence[int] | None = None,
                   cache: str | os.PathLike[str] | None = None) -> "TrainingSet":
        """Load every scan (and label map) once; reuse/write the ``.pt`` ``cache`` when given
        (it is rebuilt when the file list or shape differ)."""
        key = _cache_key(scans, labels, shape)
        if cache is not None and Path(cache).is_file():
            found = cls.load(cache)
            if found[1] == key:
                return found[0]
        images = [io.load_image(p) for p in scans]
        label_images = ([io.load_image(p, label=True) if p is not None else None for p in labels]
                        if labels is not None else None)
        out = cls.from_images(images, label_images, shape)
        if cache is not None:
            out.save(cache, key)
        return out

    def save(self, path: str | os.PathLike[str], key: str = "") -> Path:
        """Write the cached tensors to a ``.pt`` file atomically."""
        payload = {"images": self.images, "labels": self.labels, "has_labels": self.has_labels,
                   "affine": torch.from_numpy(np.asarray(self.affine, dtype=np.float64)), "key": key}
        with io.atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple["TrainingSet", str]:
        """Read a cache written by :meth:`save`: ``(training set, key)``."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(data["images"], data["labels"], data["has_labels"],
                       data["affine"].numpy()), str(data.get("key", ""))
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is a user error
            raise VoxregError(f"cannot read training cache {path}: {exc}") from exc

    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random (moving, fixed) index pairs of distinct scans, each ``(batch_size,)``."""
        n = len(self)
        moving = torch.randint(0, n, (batch_size,), generator=generator)
        offset = torch.randint(1, n, (batch_size,), generator=generator)
        return moving, (moving + offset) % n

    def validation_pairs(self) -> list[tuple[int, int]]:
        """Deterministic pairs ``(i, i+1)`` (at most 8) used for validation."""
        n = len(self)
        return [(i, (i + 1) % n) for i in range(min(n, _VAL_PAIRS))]


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
                 labels: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        sim = self.similarity(fixed, spatial.warp(moving, field_))
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


def _save(path: Path, model: VoxelMorph, optimizer: torch.optim.Optimizer, config: TrainConfig,
          step: int, generator: torch.Generator, best: float | None) -> Path:
    extra = {"train_config": config.to_dict(), "step": step, "optimizer": optimizer.state_dict(),
             "rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "best_metric": best}
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    return save_checkpoint(path, model, extra)


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    old = TrainConfig.from_dict(saved).to_dict()
    new = config.to_dict()
    changed = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        raise VoxregError(f"cannot resume from {path}: config differs in {changed} "
                          f"(only {sorted(_RESUMABLE_CHANGES)} may change)")


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


# --------------------------------------------------------------------------- train


def train(config: TrainConfig, training_set: TrainingSet, output_dir: str | os.PathLike[str],
          validation_set: TrainingSet | None = None, resume: bool = False,
          progress: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a VoxelMorph network unsupervised (see the module docstring).

    ``progress(step, row)`` is called after every step with the metrics row. With
    ``resume=True`` training continues from ``output_dir/last.pt`` up to ``config.steps``.
    SIGTERM/SIGINT stop after the current step, save ``last.pt`` and raise
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(training_set, TrainingSet):
        raise ValueError(f"training_set must be a TrainingSet, got {type(training_set).__name__}")
    if validation_set is not None and validation_set.ndim != training_set.ndim:
        raise VoxregError("validation_set and training_set must have the same dimensionality")
    configure_allocator()
    out = io.ensure_output_dir(output_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, plot_path = out / "metrics.csv", out / "loss_curve.png"
    from voxreg.api import resolve_device

    device = resolve_device(config.device)

    torch.manual_seed(config.seed)
    model = VoxelMorph(config.network_config(training_set.ndim)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    step, best, history = 0, None, []
    if resume:
        step, best, history = _restore(last_path, model, optimizer, generator, config, device, metrics_path)
    _write_metrics(metrics_path, history)

    objective = _Objective(config, training_set.num_classes)
    higher = validation_set is not None and validation_set.labels is not None
    model.train()
    with _StopSignals() as stop:
        while step < config.steps:
            moving, fixed, lam, labels = _batch(training_set, config, generator, device)
            output = model(moving, fixed, lam if config.lambda_conditional else None)
            loss, sim, reg = objective(moving, fixed, output.field, lam, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            row = {"step": step, "loss": float(loss.detach()), "similarity": float(sim.detach()),
                   "regularizer": float(reg.detach()), "lambda": float(lam.mean())}
            if validation_set is not None and (step % config.validate_every == 0 or step == config.steps):
                row.update(validate(model, validation_set, config, device))
                metric = row.get("val_dice", row["val_loss"])
                if _better(metric, best, higher):
                    best = metric
                    _save(best_path, model, optimizer, config, step, generator, best)
            history.append(row)
            _append_metrics(metrics_path, row)
            if progress is not None:
                progress(step, row)
            if step % config.checkpoint_every == 0 or step == config.steps or stop.signum is not None:
                _save(last_path, model, optimizer, config, step, generator, best)
                _plot_losses(plot_path, history)
            if stop.signum is not None:
                raise TrainingInterrupted(step, last_path, stop.signum)
    if not last_path.exists():  # resumed a run that had already finished
        _save(last_path, model, optimizer, config, step, generator, best)
    if not plot_path.exists() and history:
        _plot_losses(plot_path, history)
    return TrainResult(model.eval(), step, out, last_path, best_path if best_path.exists() else None,
                       metrics_path, plot_path, best, history)


def _restore(path: Path, model: VoxelMorph, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, config: TrainConfig, device: torch.device,
             metrics_path: Path) -> tuple[int, float | None, list[dict[str, float]]]:
    """Load ``last.pt`` into model/optimiser/RNGs; return (step, best metric, metrics rows)."""
    loaded, extra = load_checkpoint(path, device)
    _check_resume_config(extra.get("train_config", {}), config, path)
    if loaded.config != model.config:
        raise VoxregError(f"cannot resume from {path}: its network differs from the config")
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(extra["optimizer"])
    generator.set_state(extra["rng"].cpu())
    torch.set_rng_state(extra["torch_rng"].cpu())
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
    step = int(extra["step"])
    return step, extra.get("best_metric"), _read_metrics(metrics_path, step)


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
