"""Training hyper-parameters: :class:`TrainConfig`, validated on construction with
:mod:`voxreg.core.config` (a bad field is a ``ValueError`` naming it and the allowed values)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from voxreg.core.config import check_bool, check_choice, check_int, check_number, check_positive
from voxreg.nn import NetworkConfig, config_kwargs

__all__ = ["TrainConfig", "PRESETS", "RESUMABLE_CHANGES", "check_device"]

#: network presets by name
PRESETS = {"vm1": NetworkConfig.vm1, "vm2": NetworkConfig.vm2}
#: config fields that may change between a run and its resumed continuation
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "validate_every", "device", "tensorboard", "grad_checkpoint", "amp"}
)
_CUDA_INDEX = re.compile(r"cuda:\d+")


def check_device(name: str, value: Any) -> str:
    """``value`` must be ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the names
    :func:`voxreg.core.runtime.resolve_device` accepts; availability is checked when training starts)."""
    if isinstance(value, str) and _CUDA_INDEX.fullmatch(value):
        return value
    try:
        return check_choice(name, value, ("auto", "cpu", "cuda"))
    except ValueError:
        raise ValueError(f"{name} must be one of auto, cpu, cuda, cuda:N (N a GPU index); got {value!r}") from None


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`voxreg.training.train` (defaults: VoxelMorph-2, NCC 9, lambda 1).

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
    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
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
    synth: str | None = None
    synth_shape: tuple[int, ...] | None = None
    voxel_size: float | None = None
    synth_curriculum: int = 0
    init: str | None = None
    similarity_weight: float = 1.0
    fine_features: tuple[int, ...] = ()
    pairs_within_folders: bool = False
    # with ``synth`` and real scans: the share of steps drawing a synthetic pair (similarity +
    # Dice), the others a real scan pair (similarity only); 1 = synthetic pairs only
    synth_fraction: float = 1.0
    # the similarity is scored on the training scans' grid while the network sees them as
    # means of blocks this many voxels wide and its field is upsampled back (1: the same grid)
    similarity_scale: int = 1
    # the share of real-pair steps trained as a cascade's later pass (``register --passes``):
    # the moving scan is first warped by the network's own prediction (no gradient), so the
    # network learns what is left after a pass; 0 = every step on the pair as drawn
    cascade_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_choice("similarity", self.similarity, ("ncc", "mse", "mi"))
        check_int("window", self.window, 1)
        check_positive("lam", self.lam, allow_zero=True)
        self.lam_range = _check_lam_range(self.lam_range)
        check_choice("regularizer", self.regularizer, ("l2", "l1", "bending"))
        check_choice("network", self.network, tuple(PRESETS))
        check_bool("half_res", self.half_res)
        check_int("int_steps", self.int_steps, 0, 20)
        check_positive("lr", self.lr)
        for name in ("steps", "batch_size", "checkpoint_every", "validate_every"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_device("device", self.device)
        check_positive("dice_weight", self.dice_weight, allow_zero=True)
        for name in ("augment", "bidirectional", "amp", "grad_checkpoint", "tensorboard"):
            check_bool(name, getattr(self, name))
        if self.bidirectional and self.int_steps == 0:
            raise ValueError("bidirectional training needs a diffeomorphic network (int_steps > 0)")
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        self.schedule = _check_schedule(self.schedule)
        self.synth = _check_synth(self.synth)
        if self.synth_shape is not None:
            self.synth_shape = tuple(check_int("synth_shape", int(v), 8) for v in self.synth_shape)
            if len(self.synth_shape) not in (2, 3):
                raise ValueError(f"synth_shape must have 2 or 3 sizes, got {self.synth_shape!r}")
        if self.voxel_size is not None:
            self.voxel_size = check_positive("voxel_size", self.voxel_size)
        check_positive("similarity_weight", self.similarity_weight, allow_zero=True)
        self.fine_features = tuple(check_int("fine_features", int(v), 1) for v in self.fine_features)
        if self.fine_features and not self.half_res:
            raise ValueError("fine_features refine a half-resolution field: add half_res (--half-res)")
        check_bool("pairs_within_folders", self.pairs_within_folders)
        check_int("synth_curriculum", self.synth_curriculum, 0)
        self.synth_fraction = float(check_number("synth_fraction", self.synth_fraction, low=0.0, high=1.0))
        if self.synth_fraction < 1.0 and self.synth is None:
            raise ValueError("synth_fraction < 1 mixes synthetic pairs with real ones: give synth (--synth) too")
        check_int("similarity_scale", self.similarity_scale, 1, 4)
        if self.similarity_scale > 1 and (self.synth is not None or self.schedule):
            raise ValueError("similarity_scale > 1 takes real training scans without a resolution schedule")
        self.cascade_fraction = float(check_number("cascade_fraction", self.cascade_fraction, low=0.0, high=1.0))
        if self.cascade_fraction > 0 and (self.synth is not None or self.lambda_conditional):
            raise ValueError(
                "cascade_fraction > 0 takes real training scans and a fixed lambda (no --synth, no --lam-range)"
            )
        if self.init is not None and (not isinstance(self.init, str) or not self.init.strip()):
            raise ValueError(f"init must be a checkpoint path or a shipped model name, got {self.init!r}")

    @property
    def lambda_conditional(self) -> bool:
        """True when the network takes lambda as an input (``lam_range`` set)."""
        return self.lam_range is not None

    @property
    def scan_voxel_size(self) -> float | None:
        """Voxel size (mm) the training scans are loaded at: the model's, divided by
        ``similarity_scale``."""
        return None if self.voxel_size is None else self.voxel_size / self.similarity_scale

    @property
    def validation_lambda(self) -> float:
        """Lambda used for validation: ``lam``, or the geometric mean of ``lam_range``."""
        if self.lam_range is None:
            return float(self.lam)
        return math.sqrt(self.lam_range[0] * self.lam_range[1])

    def network_config(self, ndim: int) -> NetworkConfig:
        """The :class:`NetworkConfig` this training config builds for ``ndim`` spatial dims."""
        return PRESETS[self.network](
            ndim=ndim,
            int_steps=self.int_steps,
            half_res=self.half_res,
            lambda_conditional=self.lambda_conditional,
            fine_features=self.fine_features,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON- and checkpoint-safe)."""
        out = asdict(self)
        out["lam_range"] = list(self.lam_range) if self.lam_range is not None else None
        out["schedule"] = [list(stage) for stage in self.schedule]
        out["synth_shape"] = list(self.synth_shape) if self.synth_shape is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        data = config_kwargs(cls, data, "train")
        if data.get("lam_range") is not None:
            data["lam_range"] = tuple(data["lam_range"])
        if data.get("schedule") is not None:
            data["schedule"] = tuple(tuple(stage) for stage in data["schedule"])
        if data.get("synth_shape") is not None:
            data["synth_shape"] = tuple(data["synth_shape"])
        return cls(**data)

    def stage_scale(self, step: int) -> float:
        """Grid scale used for training step ``step`` (0-based) under :attr:`schedule`."""
        end = 0
        for scale, steps in self.schedule:
            end += steps
            if step < end:
                return scale
        return 1.0


def _check_lam_range(lam_range: Any) -> tuple[float, float] | None:
    """Validate ``lam_range``: None or ``(low, high)`` with ``0 < low < high``."""
    if lam_range is None:
        return None
    if isinstance(lam_range, (str, bytes)) or not isinstance(lam_range, Sequence) or len(lam_range) != 2:
        raise ValueError(f"lam_range must be (low, high) or None, got {lam_range!r}")
    low, high = lam_range
    check_positive("lam_range[0]", low)
    check_positive("lam_range[1]", high)
    if not low < high:
        raise ValueError(f"lam_range must have low < high, got {tuple(lam_range)}")
    return float(low), float(high)


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
        check_int("schedule steps", steps, 1)
    return tuple((scale, int(steps)) for scale, steps in stages)


SYNTH_SOURCES = ("brain", "shapes", "user")


def parse_synth_sources(spec: str) -> dict[str, float]:
    """``"brain:0.8,shapes:0.2"`` (or ``"brain"``) -> ``{"brain": 0.8, "shapes": 0.2}``."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        check_choice("synth source", name, SYNTH_SOURCES)
        try:
            out[name] = check_positive(f"synth weight of {name}", float(weight) if weight else 1.0)
        except ValueError:
            raise ValueError(
                f"synth must be SOURCE[:WEIGHT],... with sources {', '.join(SYNTH_SOURCES)} "
                f"and finite weights > 0, got {spec!r}"
            ) from None
    return out


def _check_synth(synth: Any) -> str | None:
    """None (real scans) or a synthetic-source spec such as ``"brain:0.8,shapes:0.2"``."""
    if synth is None:
        return None
    if not isinstance(synth, str) or not synth.strip():
        raise ValueError(f"synth must be SOURCE[:WEIGHT],... or None, got {synth!r}")
    parse_synth_sources(synth)
    return synth.strip()
