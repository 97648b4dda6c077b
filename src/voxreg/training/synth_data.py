"""Synthetic training pairs as a data source of the training loop (the counterpart of
:class:`~voxreg.training.data.TrainingSet` for ``voxreg train --synth``).

Pairs come from :class:`~voxreg.training.synth.SynthGenerator` (label maps deformed by
random smooth diffeomorphisms, random Gaussian-mixture intensities per label — or, for
brain pairs trained with an image similarity, the MNI152 T1 carried through the same
geometry —, bias, noise, blur, resolution); the objective is the Dice of the warped moving label maps plus
λ smoothness (``--dice-weight``, usually with ``--similarity-weight 0``). Licence-clean:
shapes from noise, the MNI152 tissue maps of the nilearn wheel, or the user's label maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from voxreg.training.config import TrainConfig, parse_synth_sources
from voxreg.training.data import TrainingSet
from voxreg.training.synth import SynthBatch, SynthConfig, SynthGenerator

__all__ = ["MixedSource", "SynthSource", "synth_config_of"]

_DEFAULT_SHAPE = {3: (64, 80, 64), 2: (96, 112)}


def synth_config_of(config: TrainConfig, ndim: int = 3) -> SynthConfig:
    """The :class:`SynthConfig` a training config asks for (sources, shape, seed)."""
    if config.synth is None:
        raise ValueError("this TrainConfig trains on real scans (synth is None)")
    shape = config.synth_shape or _DEFAULT_SHAPE[ndim]
    # with an image similarity in the loss, a pair must share one contrast (NCC across two random
    # contrasts is meaningless); brain parcels then take their tissue's intensity half of the time,
    # and half of the brain pairs are the MNI152 T1 itself (realistic texture for NCC)
    with_similarity = config.similarity_weight > 0
    return SynthConfig(
        shape=tuple(shape),
        sources=parse_synth_sources(config.synth),
        seed=config.seed,
        same_contrast=1.0 if with_similarity else 0.0,
        tissue_contrast=0.5 if with_similarity else 0.0,
        t1_prob=0.5 if with_similarity else 0.0,
    )


class SynthSource:
    """Synthetic pairs drawn on the fly; ``label_maps`` feed the ``user`` source."""

    def __init__(self, config: SynthConfig, label_maps: Sequence[np.ndarray | Tensor] | None = None) -> None:
        self.config = config
        self._label_maps = label_maps
        self.generator = SynthGenerator(config, label_maps=label_maps)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.config.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the generated pairs."""
        return tuple(self.config.shape)

    @property
    def num_classes(self) -> int:
        """Number of labels (background included) of every generated label map."""
        return int(self.generator.num_labels)

    def resized(self, scale: float) -> SynthSource:
        """The same source on a grid scaled by ``scale`` (coarse-to-fine schedules): sizes in
        voxels (deformations, smoothness) scale too, so the anatomy deforms alike."""
        cfg = self.config
        shape = tuple(max(8, int(round(s * scale))) for s in cfg.shape)

        def scaled(pair: tuple[float, float], low: float = 0.0) -> tuple[float, float]:
            return (max(pair[0] * scale, low), max(pair[1] * scale, low))

        config = dataclasses.replace(
            cfg,
            shape=shape,
            max_displacement=scaled(cfg.max_displacement),
            smoothness=scaled(cfg.smoothness, 2.0),
            anatomy_displacement=scaled(cfg.anatomy_displacement),
            anatomy_smoothness=scaled(cfg.anatomy_smoothness, 2.0),
            shape_smoothness=scaled(cfg.shape_smoothness, 2.0),
            shape_warp=cfg.shape_warp * scale,
        )
        return SynthSource(config, self._label_maps)

    def batch(self, batch_size: int, generator: torch.Generator, difficulty: float = 1.0) -> SynthBatch:
        """``batch_size`` fresh pairs drawn with ``generator`` (CPU); ``difficulty`` in (0, 1]
        scales the pair's deformation (curriculum)."""
        self.generator.config.difficulty = float(difficulty)
        return self.generator.sample(batch_size, generator)


class MixedSource:
    """Synthetic pairs (similarity + Dice) mixed with real scan pairs (similarity only):
    each step draws a synthetic pair with probability ``synth_fraction``, else a real one
    (``voxreg train SCANS --synth brain --synth-fraction 0.5``)."""

    def __init__(self, real: TrainingSet, synth: SynthSource, synth_fraction: float) -> None:
        if real.ndim != synth.ndim:
            raise ValueError(f"real scans are {real.ndim}D but the synthetic pairs {synth.ndim}D")
        if not 0.0 <= synth_fraction <= 1.0:
            raise ValueError(f"synth_fraction must be in [0, 1], got {synth_fraction}")
        self.real, self.synth, self.synth_fraction = real, synth, float(synth_fraction)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.real.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the real scans (the synthetic pairs keep their own)."""
        return self.real.shape

    @property
    def num_classes(self) -> int:
        """Labels of the synthetic label maps (the real scans have none)."""
        return self.synth.num_classes

    def resized(self, scale: float) -> MixedSource:
        """Both sources on grids scaled by ``scale``."""
        return MixedSource(self.real.resized(scale), self.synth.resized(scale), self.synth_fraction)

    def draws_synthetic(self, generator: torch.Generator) -> bool:
        """Whether this step's pair is synthetic (one uniform draw from ``generator``)."""
        return bool(torch.rand((), generator=generator) < self.synth_fraction)
