"""nn.unet fine branch (coarse half-resolution velocity + full-resolution correction) and
TrainingSet pairs drawn within groups."""

import pytest
import torch

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.nn import NetworkConfig, VoxelMorph, load_checkpoint, save_checkpoint
from voxreg.nn.unet import load_coarse_weights
from voxreg.training.data import TrainingSet


def _pair(shape=(16, 24, 20)):
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)


@pytest.mark.parametrize("ndim", [2, 3])
def test_widened_network_starts_as_the_coarse_one(ndim):
    """A half-res network's weights loaded into the widened one give the same velocity
    (upsampled), because the fine flow conv starts at ~0; only fine.* weights are new."""
    torch.manual_seed(0)
    coarse = VoxelMorph(NetworkConfig.vm2(ndim=ndim, half_res=True, int_steps=0))
    with torch.no_grad():  # a non-trivial coarse flow
        coarse.flow.weight.normal_(0, 0.05)
    fine = VoxelMorph(NetworkConfig.vm2(ndim=ndim, half_res=True, int_steps=0, fine_features=(8,)))
    new = load_coarse_weights(fine, coarse.state_dict())
    assert new and all(name.startswith("fine.") for name in new)
    shape = (16, 24) if ndim == 2 else (16, 24, 20)
    moving, fixed = _pair(shape)
    with torch.no_grad():
        a = coarse(moving, fixed).field
        b = fine(moving, fixed).field
    assert a.shape == b.shape == (1, ndim, *shape)
    assert float(a.abs().max()) > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(b, a, atol=1e-3 * float(a.abs().max()) + 1e-5, rtol=0)
    with torch.no_grad():  # the correction then changes the field at full resolution
        fine.fine["flow"].bias.fill_(0.5)
        c = fine(moving, fixed).field
    torch.testing.assert_close(c - a, torch.full_like(a, 0.5), atol=2e-3, rtol=0)


def test_fine_branch_is_integrated_on_the_input_grid():
    """Diffeomorphic: a constant correction v gives a displacement of exactly v (a constant
    velocity integrates to itself), at full resolution."""
    net = VoxelMorph(NetworkConfig.vm2(ndim=3, half_res=True, int_steps=5, fine_features=(4,)))
    with torch.no_grad():
        net.flow.weight.zero_()
        net.fine["flow"].weight.zero_()
        net.fine["flow"].bias.copy_(torch.tensor([0.25, -0.5, 0.75]))
    moving, fixed = _pair()
    field = net.predict_field(moving, fixed)
    expected = torch.tensor([0.25, -0.5, 0.75]).view(1, 3, 1, 1, 1).expand_as(field)
    inside = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(field[inside], expected[inside], atol=1e-4, rtol=0)


def test_fine_branch_under_bfloat16_autocast_gives_the_bits_of_float32_images():
    """The images join the bfloat16 features as bfloat16 (half the bytes): the same bits as
    concatenating them in float32, since the conv casts its input to bfloat16 anyway."""
    from voxreg.nn.unet import _upsample

    torch.manual_seed(1)
    net = VoxelMorph(NetworkConfig.vm2(ndim=3, half_res=True, int_steps=0, fine_features=(4,)))
    with torch.no_grad():
        net.fine["flow"].weight.normal_(0, 0.1)
    moving, fixed = _pair()
    inputs = torch.cat([moving, fixed], dim=1)
    features = torch.randn(1, net.fine["blocks"][0].conv.in_channels - 2, 8, 12, 10).to(torch.bfloat16)
    coarse = torch.randn(1, 3, 8, 12, 10).to(torch.bfloat16)
    entering: list[torch.dtype] = []
    hook = net.fine["blocks"][0].register_forward_pre_hook(lambda module, args: entering.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net._fine_flow(features, inputs, coarse)
        hook.remove()
        x = torch.cat([_upsample(features), inputs], dim=1)  # float32, as before
        assert x.dtype == torch.float32
        for block in net.fine["blocks"]:
            x = block(x)
        expected = spatial.resize_field(coarse, tuple(inputs.shape[2:])) + net.fine["flow"](x)
    assert entering == [torch.bfloat16]  # the full-grid concatenation is bfloat16
    assert got.dtype == expected.dtype == torch.bfloat16
    assert float(expected.float().abs().max()) > 0.1
    assert torch.equal(got, expected)


def test_fine_features_need_half_res_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="fine_features needs half_res"):
        NetworkConfig.vm2(fine_features=(8,))
    net = VoxelMorph(NetworkConfig.vm2(ndim=2, half_res=True, fine_features=(8, 4)))
    path = save_checkpoint(tmp_path / "m.pt", net)
    loaded, _ = load_checkpoint(path)
    assert loaded.config.fine_features == (8, 4)
    old = NetworkConfig.from_dict({k: v for k, v in net.config.to_dict().items() if k != "fine_features"})
    assert old.fine_features == ()  # checkpoints written before the branch existed


def test_load_coarse_weights_refuses_other_mismatches():
    fine = VoxelMorph(NetworkConfig.vm2(ndim=2, half_res=True, fine_features=(8,)))
    other = VoxelMorph(NetworkConfig.vm1(ndim=2, half_res=True))
    with pytest.raises(Exception, match="size mismatch|do not fit"):
        load_coarse_weights(fine, other.state_dict())


def test_pairs_are_drawn_within_groups():
    images = torch.rand(6, 1, 8, 8)
    data = TrainingSet(images).grouped_by(["a", "b", "a", "b", "a", "b"])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        moving, fixed = data.sample_pairs(3, g)
        for m, f in zip(moving.tolist(), fixed.tolist()):
            assert m != f and m % 2 == f % 2
            seen.add((m, f))
    assert len(seen) == 12  # every ordered pair inside each group of 3: 2 * 3 * 2
    with pytest.raises(VoxregError, match="at least 2 scans"):
        TrainingSet(images).grouped_by(["a", "a", "a", "a", "a", "b"])


@pytest.mark.parametrize("fine", [(), (4,)])
def test_the_network_inverse_is_its_negated_velocity_integrated(fine):
    """forward(inverse=True): a constant velocity v gives exactly -v (half-res and fine)."""
    torch.manual_seed(0)
    net = VoxelMorph(NetworkConfig.vm2(ndim=3, half_res=True, int_steps=5, fine_features=fine))
    moving, fixed = _pair()
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.copy_(torch.tensor([0.25, -0.5, 0.75]))
        if fine:
            net.fine["flow"].weight.zero_()
        out = net(moving, fixed, inverse=True)
    inside = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(out.inverse[inside], -out.field[inside], atol=1e-4, rtol=0)
    assert net(moving, fixed).inverse is None  # only when asked


def test_the_network_inverse_undoes_a_rough_field():
    """The shipped design (fine branch, velocity integrated on the input grid): a rough random
    velocity of up to ~2.6 voxels; the round trip of field and inverse stays within 0.06 voxel
    on average inside the grid (measured 0.033), where -field misses by 0.21."""
    torch.manual_seed(0)
    net = VoxelMorph(NetworkConfig.vm2(ndim=3, half_res=True, int_steps=5, fine_features=(4,)))
    moving, fixed = _pair()
    with torch.no_grad():
        net.flow.weight.normal_(0, 1.5)
        net.flow.bias.zero_()
        net.fine["flow"].weight.zero_()
        out = net(moving, fixed, inverse=True)
    assert float(out.field.abs().max()) > 2.0
    inside = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    residual = spatial.inverse_residual(out.field, out.inverse)[inside]
    naive = spatial.inverse_residual(out.field, -out.field)[inside]
    assert float(residual.mean()) < 0.06 and float(naive.mean()) > 3 * float(residual.mean())
