"""voxreg train --similarity-scale N: the network sees N-voxel block means of the training scans,
its field is upsampled back, and the similarity is scored on the scans' own (finer) grid."""

import numpy as np
import pytest
import torch
from tests.conftest import box_training_set

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.losses import regularizer
from voxreg.training import TrainConfig, TrainingSet, train
from voxreg.training.objective import Objective


def test_block_mean_averages_blocks():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert spatial.block_mean(image, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert spatial.block_mean(image, 1) is image


def test_upsampled_constant_field_is_in_fine_voxels():
    coarse = torch.tensor([1.5, -0.25, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 4, 5, 6)
    fine = spatial.upsample_field(coarse, 2)
    assert fine.shape == (1, 3, 8, 10, 12)
    torch.testing.assert_close(fine[:, :, 3, 4, 5].flatten(), torch.tensor([3.0, -0.5, 4.0]))


def test_upsampled_linear_field_maps_the_same_world_points():
    """Coarse voxel c covers fine voxels 2c and 2c+1 (centre 2c + 0.5). A coarse displacement
    u(c) = 0.1 c (coarse voxels) moves fine voxel x (at coarse coordinate (x + 0.5)/2 - 0.5) by
    2 * 0.1 * ((x + 0.5)/2 - 0.5) fine voxels, away from the clamped border."""
    c = torch.arange(8.0)
    coarse = (0.1 * c).view(1, 1, 8, 1).expand(1, 2, 8, 3).clone()
    coarse[:, 1] = 0
    fine = spatial.upsample_field(coarse, 2)[0, 0, :, 2]
    x = torch.arange(16.0)
    expected = 2 * 0.1 * ((x + 0.5) / 2 - 0.5)
    torch.testing.assert_close(fine[1:-1], expected[1:-1])


def test_fine_warp_of_a_whole_coarse_voxel_shift_averages_to_the_coarse_warp():
    """Shifting by one coarse voxel is shifting by 2 fine voxels: block means of the fine warp
    equal the coarse warp of the block means, exactly, inside the border."""
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 16, 12, 10, generator=rng)
    coarse = torch.zeros(1, 3, 8, 6, 5)
    coarse[:, 0] = 1.0
    fine_warp = spatial.warp(image, spatial.upsample_field(coarse, 2))
    coarse_warp = spatial.warp(spatial.block_mean(image, 2), coarse)
    torch.testing.assert_close(spatial.block_mean(fine_warp, 2)[..., :6, :, :], coarse_warp[..., :6, :, :])


def test_objective_regularises_the_network_field_when_given():
    objective = Objective(TrainConfig(similarity="mse", lam=1.0), 0)
    image = torch.rand(1, 1, 8, 8, 8)
    coarse = torch.randn(1, 3, 4, 4, 4)
    fine = spatial.upsample_field(coarse, 2)
    lam = torch.ones(1)
    _, _, reg = objective(image, image, fine, lam, network_field=coarse)
    torch.testing.assert_close(reg, regularizer("l2")(coarse))
    _, _, reg_fine = objective(image, image, fine, lam)
    assert abs(float(reg_fine) - float(reg)) > 1e-3


def test_training_feeds_the_network_block_means_and_scores_the_fine_grid(tmp_path):
    data = box_training_set((32, 32, 32))
    config = TrainConfig(similarity_scale=2, steps=2, device="cpu", validate_every=2, checkpoint_every=2)
    seen = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "VoxelMorph":
            seen.append(tuple(args[0].shape[2:]))
        return original(module, *args, **kwargs)

    torch.nn.Module.__call__ = spy
    try:
        result = train(config, data, tmp_path / "run", validation_set=data)
    finally:
        torch.nn.Module.__call__ = original
    assert seen and set(seen) == {(16, 16, 16)}
    assert np.isfinite(result.history[-1]["val_loss"])


def test_similarity_scale_refusals(tmp_path):
    with pytest.raises(ValueError, match="similarity_scale > 1 takes real training scans"):
        TrainConfig(similarity_scale=2, synth="shapes", dice_weight=1.0)
    with pytest.raises(VoxregError, match=r"grid \(31, 32, 32\) is not a multiple of 2"):
        train(TrainConfig(similarity_scale=2, steps=1, device="cpu"), box_training_set((31, 32, 32)), tmp_path / "x")
    assert TrainConfig(voxel_size=2.07, similarity_scale=2).scan_voxel_size == pytest.approx(1.035)


def test_cli_loads_scans_at_half_the_model_voxel_size_and_keeps_the_model_space(tmp_path):
    """`voxreg train --init brain --similarity-scale 2`: scans at 1.5 mm are loaded at 2.07 / 2 mm
    (40 x 1.5 / 1.035 -> 58 voxels, 44 -> 64, 36 -> 52); the checkpoint keeps the 2.07 mm space."""
    from typer.testing import CliRunner

    from voxreg.cli import app
    from voxreg.core.image import Image
    from voxreg.io import save_image
    from voxreg.nn import load_checkpoint

    paths = []
    for i in range(2):
        volume = np.zeros((40, 44, 36), np.float32)
        volume[8 + i : 30 + i, 10:34, 6:30] = 1.0
        paths.append(str(save_image(Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / f"s{i}.nii.gz")))
    cache = tmp_path / "cache.pt"
    args = ["train", *paths, "--init", "brain", "--similarity-scale", "2", "--steps", "1", "--device", "cpu"]
    out = CliRunner().invoke(app, [*args, "--cache", str(cache), "-o", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert tuple(TrainingSet.load(cache)[0].shape) == (58, 64, 52)
    _, extra = load_checkpoint(tmp_path / "run" / "last.pt")
    assert extra["model_space"]["voxel_size"] == [2.07] * 3
    assert extra["train_config"]["similarity_scale"] == 2
