"""VoxelMorph registration network (Balakrishnan et al., CVPR 2018 / TMI 2019).

The network concatenates moving and fixed images, runs a U-Net (stride-2 3x3 convs in
the encoder, nearest upsampling + skip concatenation in the decoder, LeakyReLU 0.2) and
predicts a displacement field in voxels of the input grid, ``(N, ndim, *S)``, channel
``d`` = axis ``d`` (see :mod:`voxreg.core.spatial`). Variants:

- ``int_steps > 0``: the output is a stationary velocity, integrated by scaling and
  squaring into a diffeomorphic displacement.
- ``half_res``: the last decoder upsampling is skipped; the field (or velocity, which is
  integrated there) lives at half resolution and is upsampled with
  :func:`voxreg.core.spatial.resize_field`. The input stays at full resolution.
- ``lambda_conditional``: a tiny MLP maps ``log(lambda)`` (one regularisation weight per
  sample) to a per-channel scale and shift (FiLM) of every conv block, so one network
  covers a range of regularisation weights (HyperMorph-lite).

Any input size works: inputs are padded at the end of each axis to a multiple of
``2**len(enc_features)`` (replicate padding) and the field is cropped back.
Checkpoints are written by :func:`save_checkpoint` and read by :func:`load_checkpoint`.

Speed (CPU): 3D convs run in ``channels_last_3d`` (``VoxelMorph.channels_last``, on by
default, same results); ``register(..., bf16=True)`` adds bfloat16 autocast for the
U-Net only. ``benchmarks/bench_network.py`` times the variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from voxreg.core import spatial

__all__ = [
    "NetworkConfig",
    "NetworkOutput",
    "VoxelMorph",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
]

CHECKPOINT_FORMAT = "voxreg-checkpoint"
CHECKPOINT_VERSION = 1
_LEAKY_SLOPE = 0.2
_FILM_HIDDEN = 32
_FLOW_INIT_STD = 1e-5


# --------------------------------------------------------------------------- config


def _as_feature_tuple(name: str, value: Any) -> tuple[int, ...]:
    """Validate a feature list: a non-empty sequence of positive ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return items


def _check_bool(name: str, value: Any) -> None:
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
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing keys use defaults."""
        return cls(**config_kwargs(cls, data, "network"))


# --------------------------------------------------------------------------- modules


@dataclass
class NetworkOutput:
    """Output of :meth:`VoxelMorph.forward`.

    ``field``: displacement ``(N, ndim, *S)`` in voxels of the input grid (integrated
    when diffeomorphic). ``velocity``: the stationary velocity on the same grid, or None
    for a plain displacement network.
    """

    field: Tensor
    velocity: Tensor | None = None


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


def _conv_cls(ndim: int) -> type[nn.Module]:
    return nn.Conv3d if ndim == 3 else nn.Conv2d


class _ConvBlock(nn.Module):
    """3x3(x3) conv (stride 1 or 2), optional FiLM modulation, LeakyReLU(0.2)."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = _conv_cls(ndim)(cin, cout, kernel_size=3, stride=stride, padding=1)
        self.out_channels = cout

    def forward(self, x: Tensor, film: tuple[Tensor, Tensor] | None = None) -> Tensor:
        y = self.conv(x)
        if film is not None:
            scale, shift = film
            y = torch.addcmul(shift.to(y.dtype), y, scale.to(y.dtype))
        return F.leaky_relu_(y, _LEAKY_SLOPE)


class _FiLM(nn.Module):
    """Tiny MLP: log(lambda) (N,) -> per-block (scale, shift), each (N, C, 1, ...).

    The last layer starts at zero, so a fresh network is not modulated (scale 1, shift 0).
    """

    def __init__(self, ndim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.ndim = ndim
        self.channels = tuple(channels)
        self.mlp = nn.Sequential(
            nn.Linear(1, _FILM_HIDDEN),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.Linear(_FILM_HIDDEN, _FILM_HIDDEN),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.Linear(_FILM_HIDDEN, 2 * sum(self.channels)),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, log_lam: Tensor) -> list[tuple[Tensor, Tensor]]:
        params = self.mlp(log_lam.view(-1, 1))
        n = params.shape[0]
        out, start = [], 0
        view = (n, -1) + (1,) * self.ndim
        for c in self.channels:
            scale = 1.0 + params[:, start : start + c].reshape(view)
            shift = params[:, start + c : start + 2 * c].reshape(view)
            out.append((scale, shift))
            start += 2 * c
        return out


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad the end of every spatial axis to a multiple of ``multiple``."""
    pads: list[int] = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % multiple]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def _crop(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Crop the end of the spatial axes back to ``shape`` (contiguous)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return x[(..., *(slice(0, s) for s in shape))].contiguous()


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class VoxelMorph(nn.Module):
    """VoxelMorph U-Net: ``forward(moving, fixed, lam=None) -> NetworkOutput``.

    Inputs are ``(N, in_channels, *S)`` float tensors of any spatial size, scaled to
    roughly [0, 1]. ``lam`` (one positive regularisation weight per sample, or a scalar)
    is required when the config is ``lambda_conditional`` and refused otherwise.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else NetworkConfig()
        cfg = self.config
        self.encoder = nn.ModuleList()
        prev = 2 * cfg.in_channels
        skips = [prev]
        for f in cfg.enc_features:
            self.encoder.append(_ConvBlock(cfg.ndim, prev, f, stride=2))
            prev = f
            skips.append(f)
        self.decoder = nn.ModuleList()
        for i, f in enumerate(cfg.dec_features):
            self.decoder.append(_ConvBlock(cfg.ndim, prev, f))
            prev = f + self._skip_channels(i, skips)
        self.flow = _conv_cls(cfg.ndim)(prev, cfg.ndim, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=_FLOW_INIT_STD)
        nn.init.zeros_(self.flow.bias)
        blocks = [*self.encoder, *self.decoder]
        self.film = _FiLM(cfg.ndim, [b.out_channels for b in blocks]) if cfg.lambda_conditional else None
        #: run 3D convs on CPU in channels_last_3d memory format (about 1.5x faster with
        #: oneDNN); a runtime switch, not part of the config or the checkpoint.
        self.channels_last = True
        #: recompute each conv block's activations in the backward pass instead of storing
        #: them (training only): less memory for large volumes, ~30 % more time. Runtime switch.
        self.grad_checkpoint = False

    # ---- architecture helpers

    def _skip_index(self, i: int) -> int | None:
        """Index into ``[input, enc_0, enc_1, ...]`` of the skip concatenated (after a 2x
        upsampling) to the output of decoder conv ``i``; None when ``i`` is not followed
        by an upsampling. The first ``levels - 1`` convs climb back to 1/2 resolution,
        two convs run there, then (unless ``half_res``) one upsampling to the input grid."""
        levels = self.config.levels
        if i < levels - 1:
            return levels - 1 - i
        if i == levels and not self.config.half_res:
            return 0
        return None

    def _skip_channels(self, i: int, skips: list[int]) -> int:
        """Channels concatenated after decoder conv ``i`` (0 when none)."""
        index = self._skip_index(i)
        return 0 if index is None else skips[index]

    # ---- forward

    def _log_lambda(self, lam: float | Tensor | None, n: int, like: Tensor) -> Tensor | None:
        """Validate ``lam`` against the config; return log(lambda) of shape (N,) or None."""
        if not self.config.lambda_conditional:
            if lam is not None:
                raise ValueError("lam was given but the network is not lambda_conditional")
            return None
        if lam is None:
            raise ValueError("this network is lambda_conditional: pass lam (regularisation weight > 0)")
        lam_t = torch.as_tensor(lam, dtype=like.dtype, device=like.device).reshape(-1)
        if lam_t.numel() == 1:
            lam_t = lam_t.expand(n)
        if lam_t.numel() != n:
            raise ValueError(f"lam must be a scalar or have one value per sample ({n}), got {lam_t.numel()}")
        if not bool(torch.all(torch.isfinite(lam_t) & (lam_t > 0))):
            raise ValueError("lam must be finite and > 0")
        return lam_t.log()

    def _check_inputs(self, moving: Tensor, fixed: Tensor) -> None:
        cfg = self.config
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.dim() != cfg.ndim + 2:
                raise ValueError(
                    f"{name} must be (N, C, *spatial) with {cfg.ndim} spatial dims, got shape {tuple(t.shape)}"
                )
            if t.shape[1] != cfg.in_channels:
                raise ValueError(f"{name} has {t.shape[1]} channels, the network expects {cfg.in_channels}")
            if not torch.is_floating_point(t):
                raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} "
                "must have the same shape (resample onto the fixed grid first)"
            )

    def _unet(self, x: Tensor, film: list[tuple[Tensor, Tensor]] | None) -> Tensor:
        """Raw flow output on the padded grid (half resolution when ``half_res``)."""
        levels = self.config.levels
        if self.channels_last and x.dim() == 5 and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = [x]
        for j, block in enumerate(self.encoder):
            x = self._block(block, x, film[j] if film else None)
            skips.append(x)
        for i in range(len(self.decoder)):
            step_film = film[levels + i] if film else None
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # one segment = conv block + upsampling + skip concatenation: the large
                # upsampled/concatenated tensors are recomputed instead of stored
                x = torch.utils.checkpoint.checkpoint(self._decode_step, i, x, skips, step_film, use_reentrant=False)
            else:
                x = self._decode_step(i, x, skips, step_film)
        return self.flow(x).contiguous()

    def _decode_step(self, i: int, x: Tensor, skips: list[Tensor], film: tuple[Tensor, Tensor] | None) -> Tensor:
        """Decoder conv ``i``, then (where the architecture has one) 2x upsampling and the
        concatenation of the matching skip."""
        x = self.decoder[i](x, film)
        index = self._skip_index(i)
        if index is not None:
            x = torch.cat([_upsample(x), skips[index]], dim=1)
        return x

    def _block(self, block: nn.Module, x: Tensor, film: tuple[Tensor, Tensor] | None) -> Tensor:
        """Run one conv block, through activation checkpointing when enabled and training."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, film, use_reentrant=False)
        return block(x, film)

    def _raw_flow(
        self, moving: Tensor, fixed: Tensor, lam: float | Tensor | None, bf16: bool = False
    ) -> tuple[Tensor, tuple[int, ...]]:
        """Validate, pad, run the U-Net: (raw float32 flow, padded full-res shape)."""
        self._check_inputs(moving, fixed)
        log_lam = self._log_lambda(lam, moving.shape[0], moving)
        film = self.film(log_lam) if self.film is not None else None
        x = _pad_to_multiple(torch.cat([moving, fixed], dim=1), 2**self.config.levels)
        if not bf16:
            return self._unet(x, film), tuple(x.shape[2:])
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            flow = self._unet(x, film)
        return flow.float(), tuple(x.shape[2:])

    def _to_input_grid(self, field: Tensor, padded: tuple[int, ...], shape: Sequence[int]) -> Tensor:
        """Upsample a (half-res) field to the padded grid, then crop to the input shape."""
        return _crop(spatial.resize_field(field, padded), shape)

    def forward(self, moving: Tensor, fixed: Tensor, lam: float | Tensor | None = None) -> NetworkOutput:
        """Predict the displacement that warps ``moving`` onto ``fixed``."""
        shape = tuple(moving.shape[2:])
        flow, padded = self._raw_flow(moving, fixed, lam)
        if not self.config.diffeomorphic:
            return NetworkOutput(field=self._to_input_grid(flow, padded, shape))
        field = spatial.integrate_velocity(flow, self.config.int_steps)
        return NetworkOutput(
            field=self._to_input_grid(field, padded, shape), velocity=self._to_input_grid(flow, padded, shape)
        )

    def predict_field(
        self, moving: Tensor, fixed: Tensor, lam: float | Tensor | None = None, *, bf16: bool = False
    ) -> Tensor:
        """Displacement field only: like ``forward(...).field`` without resampling the velocity.

        ``bf16=True`` runs the U-Net convs under bfloat16 autocast (integration, resizing
        and the returned field stay float32): about 1.5-2x faster on CPUs with AVX512-BF16
        or AMX and on GPUs, at ~1e-3 relative error in the field. Inference only.
        """
        shape = tuple(moving.shape[2:])
        flow, padded = self._raw_flow(moving, fixed, lam, bf16)
        if self.config.diffeomorphic:
            flow = spatial.integrate_velocity(flow, self.config.int_steps)
        return self._to_input_grid(flow, padded, shape)

    def register(
        self, moving: Tensor, fixed: Tensor, lam: float | Tensor | None = None, *, bf16: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Inference: ``(moving warped onto fixed, field)`` under ``torch.inference_mode``.

        See :meth:`predict_field` for ``bf16``.
        """
        with torch.inference_mode():
            field = self.predict_field(moving, fixed, lam, bf16=bf16)
            return spatial.warp(moving, field), field
