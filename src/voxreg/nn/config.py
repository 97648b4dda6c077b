"""The architecture config of a :class:`~voxreg.nn.unet.VoxelMorph` network and the
dict checks shared by voxreg's config dataclasses. Torch-free, so that :mod:`voxreg.training.config`
and the ``voxreg train`` options (``voxreg --help``) do not import torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["NetworkConfig", "config_kwargs"]


def _as_feature_tuple(name: str, value: Any) -> tuple[int, ...]:
    """Validate a feature list: a non-empty sequence of positive ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return items


def _check_bool(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class NetworkConfig:
    """Architecture of a :class:`VoxelMorph` network (defaults: VM-2, 3D, plain displacement).

    ``dec_features`` needs at least ``len(enc_features) + 2`` entries: one conv per
    upsampling level, two at half resolution, then the rest at full resolution (or still
    at half resolution when ``half_res``), followed by the flow conv.
    """

    ndim: int = 3
    enc_features: tuple[int, ...] = (16, 32, 32, 32)
    dec_features: tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    int_steps: int = 0
    half_res: bool = False
    lambda_conditional: bool = False
    in_channels: int = 1
    fine_features: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3) or isinstance(self.ndim, bool):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        self.enc_features = _as_feature_tuple("enc_features", self.enc_features)
        self.dec_features = _as_feature_tuple("dec_features", self.dec_features)
        need = len(self.enc_features) + 2
        if len(self.dec_features) < need:
            raise ValueError(
                f"dec_features must have at least len(enc_features) + 2 = {need} entries, got {len(self.dec_features)}"
            )
        if not isinstance(self.int_steps, int) or isinstance(self.int_steps, bool) or not 0 <= self.int_steps <= 20:
            raise ValueError(f"int_steps must be an int in [0, 20] (0 = plain displacement), got {self.int_steps!r}")
        _check_bool("half_res", self.half_res)
        self.fine_features = _as_feature_tuple("fine_features", self.fine_features) if self.fine_features else ()
        if self.fine_features and not self.half_res:
            raise ValueError("fine_features needs half_res=True (it refines the half-resolution field)")
        _check_bool("lambda_conditional", self.lambda_conditional)
        if not isinstance(self.in_channels, int) or isinstance(self.in_channels, bool) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")

    @property
    def levels(self) -> int:
        """Number of stride-2 downsamplings; inputs are padded to a multiple of 2**levels."""
        return len(self.enc_features)

    @property
    def diffeomorphic(self) -> bool:
        """True when the network predicts a velocity integrated by scaling and squaring."""
        return self.int_steps > 0

    @classmethod
    def vm1(cls, ndim: int = 3, **kwargs: Any) -> NetworkConfig:
        """VoxelMorph-1 (CVPR 2018): enc (16, 32, 32, 32), dec (32, 32, 32, 32, 8, 8)."""
        return cls(ndim=ndim, enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32, 8, 8), **kwargs)

    @classmethod
    def vm2(cls, ndim: int = 3, **kwargs: Any) -> NetworkConfig:
        """VoxelMorph-2: enc (16, 32, 32, 32), dec (32, 32, 32, 32, 32, 16, 16)."""
        return cls(ndim=ndim, enc_features=(16, 32, 32, 32), dec_features=(32, 32, 32, 32, 32, 16, 16), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON- and weights_only-safe) dict of the config."""
        out = asdict(self)
        out["enc_features"] = list(self.enc_features)
        out["dec_features"] = list(self.dec_features)
        out["fine_features"] = list(self.fine_features)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing keys use defaults."""
        return cls(**config_kwargs(cls, data, "network"))


def config_kwargs(cls: type, data: Any, what: str) -> dict[str, Any]:
    """Check that ``data`` is a dict whose keys are fields of the dataclass ``cls``
    (ValueError naming unknown keys and the allowed ones); returns a copy."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} config must be a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {sorted(known)}")
    return dict(data)
