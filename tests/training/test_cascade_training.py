"""voxreg train --cascade-fraction F: a share of the steps trains the network as a later pass of
a cascade (``register --passes``), on the moving scan warped by its own prediction first."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.conftest import box_training_set

from voxreg.training import TrainConfig, train
from voxreg.training.trainer import _after_a_pass


class ConstantField(torch.nn.Module):
    """A stand-in network: one coarse voxel along the first axis, whatever the pair; it records
    the inputs it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, moving, fixed, lam=None):
        self.seen.append(tuple(moving.shape[2:]))
        field = torch.zeros(1, 3, *moving.shape[2:])
        field[:, 0] = 1.0
        return SimpleNamespace(field=field)


def test_the_next_pass_sees_the_moving_scan_warped_by_the_network_on_the_fine_grid():
    """At --similarity-scale 2 the network sees 2-voxel block means and predicts one coarse
    voxel: the moving scan is warped by 2 fine voxels, exactly (away from the clamped border)."""
    rng = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, 16, 12, 10, generator=rng)
    net = ConstantField()
    warped = _after_a_pass(net, TrainConfig(similarity_scale=2), moving, moving.clone(), torch.ones(1), None)
    assert net.seen == [(8, 6, 5)]
    torch.testing.assert_close(warped[0, 0, :-3], moving[0, 0, 2:-1])
    assert not warped.requires_grad


def test_training_with_every_step_a_later_pass_runs_the_network_twice_per_step(tmp_path):
    data = box_training_set((32, 32, 32))
    calls = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "VoxelMorph":
            calls.append(torch.is_grad_enabled())
        return original(module, *args, **kwargs)

    torch.nn.Module.__call__ = spy
    try:
        config = TrainConfig(steps=3, device="cpu", cascade_fraction=1.0, validate_every=3, checkpoint_every=3)
        result = train(config, data, tmp_path / "run", validation_set=data)
    finally:
        torch.nn.Module.__call__ = original
    # each step: the first pass without gradient, then the trained pass; validation: one pass
    assert calls[:6] == [False, True] * 3
    assert np.isfinite(result.history[-1]["val_loss"])


def test_cascade_fraction_refusals():
    with pytest.raises(ValueError, match="cascade_fraction"):
        TrainConfig(cascade_fraction=1.5)
    with pytest.raises(ValueError, match="cascade_fraction > 0 takes real training scans and a fixed lambda"):
        TrainConfig(cascade_fraction=0.5, synth="shapes", dice_weight=1.0)
    with pytest.raises(ValueError, match="cascade_fraction > 0 takes real training scans and a fixed lambda"):
        TrainConfig(cascade_fraction=0.5, lam_range=(0.1, 10.0))
