"""Tests for voxreg.networks: VoxelMorph U-Net, config and checkpoints (tiny sizes, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from voxreg.core import spatial
from voxreg.core.errors import CheckpointError
from voxreg.nn import NetworkConfig, NetworkOutput, VoxelMorph, load_checkpoint, save_checkpoint

ENC = (4, 8, 8)
DEC = (8, 8, 8, 8, 4)


def tiny(ndim: int, **kwargs) -> NetworkConfig:
    return NetworkConfig(ndim=ndim, enc_features=ENC, dec_features=DEC, **kwargs)


def pair(shape, n: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *shape, generator=g), torch.rand(n, 1, *shape, generator=g)


def randomise(model: VoxelMorph, std: float = 0.3, seed: int = 1) -> VoxelMorph:
    """Give every parameter non-trivial values (a fresh net outputs ~0 and no FiLM)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# --------------------------------------------------------------------------- config


def test_presets_match_paper():
    vm1, vm2 = NetworkConfig.vm1(3), NetworkConfig.vm2(2)
    assert vm1.enc_features == (16, 32, 32, 32) and vm1.dec_features == (32, 32, 32, 32, 8, 8)
    assert vm2.ndim == 2 and vm2.dec_features == (32, 32, 32, 32, 32, 16, 16)
    assert NetworkConfig() == NetworkConfig.vm2(3)


def test_config_dict_round_trip():
    cfg = tiny(2, int_steps=5, half_res=True, lambda_conditional=True)
    data = cfg.to_dict()
    assert data["enc_features"] == list(ENC)
    assert NetworkConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"ndim": 4}, "ndim"),
        ({"enc_features": ()}, "enc_features"),
        ({"enc_features": (8, -1)}, "enc_features"),
        ({"dec_features": (8, 8)}, "dec_features"),
        ({"int_steps": -1}, "int_steps"),
        ({"half_res": "yes"}, "half_res"),
        ({"lambda_conditional": 1}, "lambda_conditional"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NetworkConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        NetworkConfig.from_dict({"ndim": 2, "bogus": 1})


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("shape", [(21, 23, 19), (37, 41)])
@pytest.mark.parametrize("variant", [{}, {"half_res": True}, {"int_steps": 4}, {"int_steps": 4, "half_res": True}])
def test_output_shape_matches_odd_input(shape, variant):
    model = VoxelMorph(tiny(len(shape), **variant))
    moving, fixed = pair(shape, n=2)
    out = model(moving, fixed)
    assert isinstance(out, NetworkOutput)
    assert out.field.shape == (2, len(shape), *shape)
    assert out.field.dtype == torch.float32 and out.field.is_contiguous()
    if variant.get("int_steps"):
        assert out.velocity is not None and out.velocity.shape == out.field.shape
    else:
        assert out.velocity is None


def test_fresh_network_gives_near_zero_field():
    model = VoxelMorph(tiny(3))
    out = model(*pair((16, 16, 16)))
    assert out.field.abs().max() < 1e-3


def test_half_res_predicts_at_half_resolution():
    model = VoxelMorph(tiny(3, half_res=True))
    seen = []
    model.flow.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape[2:])))
    out = model(*pair((21, 23, 19)))
    assert seen == [(12, 12, 12)]  # padded to 24^3, predicted at half resolution
    assert out.field.shape[2:] == (21, 23, 19)


def test_half_res_field_is_upsampled_flow():
    """A constant half-res flow of 1 voxel becomes ~2 voxels on the full grid."""
    model = VoxelMorph(tiny(2, half_res=True))
    with torch.no_grad():
        model.flow.weight.zero_()
        model.flow.bias.fill_(1.0)
    field = model(*pair((32, 32))).field
    expected = 31 / 15  # resize_field: (32 - 1) / (16 - 1) voxels per half-res voxel
    assert torch.allclose(field, torch.full_like(field, expected), atol=1e-5)


def smooth_velocity(shape, amplitude: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(shape), 5, 5, generator=g) * amplitude
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)


@pytest.mark.parametrize("int_steps, folds", [(7, False), (0, True)])
def test_diffeomorphic_mode_prevents_folding(int_steps, folds):
    model = VoxelMorph(tiny(2, int_steps=int_steps))
    velocity = smooth_velocity((40, 40))
    model.flow.register_forward_hook(lambda mod, inp, out: velocity)  # large random flow
    out = model(*pair((40, 40)))
    assert out.field.abs().max() > 5
    det_min = spatial.jacobian_determinant(out.field).min()
    assert (det_min <= 0) == folds
    if int_steps:
        assert torch.allclose(out.velocity, velocity)


def test_lambda_conditional_output_depends_on_lambda():
    model = randomise(VoxelMorph(tiny(2, lambda_conditional=True)), std=0.2)
    moving, fixed = pair((24, 24))
    a = model(moving, fixed, lam=0.1).field
    b = model(moving, fixed, lam=10.0).field
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a, model(moving, fixed, lam=torch.tensor([0.1])).field)
    both = model(moving.repeat(2, 1, 1, 1), fixed.repeat(2, 1, 1, 1), lam=torch.tensor([0.1, 10.0])).field
    assert torch.allclose(both[0], a[0], atol=1e-5) and torch.allclose(both[1], b[0], atol=1e-5)
    both.square().mean().backward()
    assert model.film.mlp[0].weight.grad.abs().sum() > 0


def test_lambda_conditional_starts_unmodulated():
    cond, plain = VoxelMorph(tiny(2, lambda_conditional=True)), VoxelMorph(tiny(2))
    plain.load_state_dict({k: v for k, v in cond.state_dict().items() if not k.startswith("film.")})
    moving, fixed = pair((16, 16))
    assert torch.allclose(cond(moving, fixed, lam=3.0).field, plain(moving, fixed).field)


def test_lambda_argument_is_validated():
    cond, plain = VoxelMorph(tiny(2, lambda_conditional=True)), VoxelMorph(tiny(2))
    moving, fixed = pair((16, 16))
    with pytest.raises(ValueError, match="lam"):
        cond(moving, fixed)
    with pytest.raises(ValueError, match="lam"):
        cond(moving, fixed, lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        plain(moving, fixed, lam=1.0)


def test_inputs_are_validated():
    model = VoxelMorph(tiny(3))
    moving, fixed = pair((16, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        model(moving, fixed[..., :8])
    with pytest.raises(ValueError, match="spatial dims"):
        model(moving[..., 0], fixed[..., 0])
    with pytest.raises(ValueError, match="channels"):
        model(moving.repeat(1, 2, 1, 1, 1), fixed.repeat(1, 2, 1, 1, 1))


def test_channels_last_gives_same_result():
    model = randomise(VoxelMorph(tiny(3)), std=0.2)
    moving, fixed = pair((16, 20, 24))
    a = model(moving, fixed).field
    model.channels_last = False
    assert torch.allclose(a, model(moving, fixed).field, atol=1e-5)


def test_register_warps_moving_without_autograd():
    model = randomise(VoxelMorph(tiny(2, int_steps=3)), std=0.1)
    moving, fixed = pair((21, 26))
    warped, field = model.register(moving, fixed)
    assert warped.shape == moving.shape and field.shape == (1, 2, 21, 26)
    assert not field.requires_grad
    assert torch.allclose(field, model(moving, fixed).field, atol=1e-6)
    assert torch.allclose(warped, spatial.warp(moving, field))


def test_register_bf16_is_close_to_float32():
    model = randomise(VoxelMorph(tiny(3, int_steps=3, lambda_conditional=True)), std=0.1)
    moving, fixed = pair((16, 18, 20))
    _, ref = model.register(moving, fixed, lam=1.0)
    warped, field = model.register(moving, fixed, lam=1.0, bf16=True)
    assert field.dtype == torch.float32 and warped.dtype == torch.float32
    assert (field - ref).abs().max() < 0.05 * ref.abs().max()


def blob(shape, centre) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
    return torch.exp(-r2 / (2 * 4.0**2))[None, None]


def test_tiny_overfit_reduces_loss():
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig(ndim=2, enc_features=(8, 16, 16), dec_features=(16, 16, 16, 16, 8)))
    fixed, moving = blob((32, 32), (15, 16)), blob((32, 32), (17, 14))  # known shift (2, -2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        field = model(moving, fixed).field
        smooth = sum(d.square().mean() for d in torch.gradient(field, dim=(2, 3)))
        return F.mse_loss(spatial.warp(moving, field), fixed) + 0.01 * smooth

    initial = loss_fn().item()
    for _ in range(40):
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimiser.step()
    final = loss_fn().item()
    assert final < 0.1 * initial
    centre = model(moving, fixed).field[0, :, 15, 16]
    assert torch.allclose(centre, torch.tensor([2.0, -2.0]), atol=0.75)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def trained(tmp_path) -> tuple[VoxelMorph, Path]:
    model = randomise(VoxelMorph(tiny(3, int_steps=3, lambda_conditional=True)), std=0.1)
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, extra={"epoch": 7, "loss": [0.5, 0.25]})
    return model, path


def test_checkpoint_round_trip(trained, tmp_path):
    model, path = trained
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 7, "loss": [0.5, 0.25]}
    assert loaded.config == model.config
    moving, fixed = pair((13, 17, 11))
    with torch.no_grad():
        assert torch.equal(loaded(moving, fixed, lam=0.5).field, model(moving, fixed, lam=0.5).field)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_save_checkpoint_rejects_unloadable_extra(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(tmp_path / "m.pt", VoxelMorph(tiny(2)), extra={"path": Path("x")})
    assert not list(tmp_path.iterdir())


def _write_bad(path: Path, kind: str, good: Path) -> None:
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file\n" * 10)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "raw_state_dict":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "pickled_object":
        torch.save({"format": "voxreg-checkpoint", "obj": Path("x")}, path)
    else:
        payload = torch.load(good, weights_only=True)
        if kind == "config_mismatch":
            payload["config"]["enc_features"] = [4, 8, 16]
        elif kind == "missing_key":
            payload["state_dict"].pop("flow.weight")
        elif kind == "unexpected_key":
            payload["state_dict"]["extra.weight"] = torch.zeros(1)
        elif kind == "bad_config":
            payload["config"]["ndim"] = 5
        elif kind == "future_version":
            payload["version"] = 99
        torch.save(payload, path)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "garbage",
        "truncated",
        "empty",
        "raw_state_dict",
        "pickled_object",
        "config_mismatch",
        "missing_key",
        "unexpected_key",
        "bad_config",
        "future_version",
    ],
)
def test_bad_checkpoint_raises_one_line_error(trained, tmp_path, kind):
    _, good = trained
    bad = tmp_path / f"{kind}.pt"
    if kind != "missing":
        _write_bad(bad, kind, good)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def _randomised(model: VoxelMorph, seed: int = 0) -> VoxelMorph:
    """The network with every weight random (the flow conv starts at ~0 otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", [{"half_res": True}, {"half_res": True, "fine_features": (4,)}, {}])
def test_symmetric_inference_is_inverse_consistent(variant):
    """Averaging v(M->F) with -v(F->M): swapping the images negates the velocity exactly, so
    the two fields are each other's inverse up to integration error, and the plain forward
    is untouched (the velocity it averages)."""
    model = _randomised(VoxelMorph(tiny(3, int_steps=5, **variant)))
    generator = torch.Generator().manual_seed(1)
    moving, fixed = (torch.rand(1, 1, 16, 16, 16, generator=generator) for _ in range(2))
    with torch.no_grad():
        forward = model(moving, fixed, symmetric=True)
        backward = model(fixed, moving, symmetric=True)
        plain = [model(moving, fixed).velocity, model(fixed, moving).velocity]
    assert float(forward.velocity.abs().max()) > 0.05  # a real velocity, not ~0
    torch.testing.assert_close(forward.velocity, -backward.velocity, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward.velocity, (plain[0] - plain[1]) / 2, atol=1e-5, rtol=0)
    round_trip = spatial.compose(backward.field, forward.field)
    plain_trip = spatial.compose(model(fixed, moving).field, model(moving, fixed).field).detach()
    assert float(round_trip.abs().mean()) < 0.5 * float(plain_trip.abs().mean())


@pytest.mark.parametrize("bf16", [False, True])
def test_symmetric_inference_runs_the_flow_heads_once_per_pair(bf16):
    """The flow heads are linear, so symmetric inference runs them on the half difference of
    the two directions' features: each head sees one item per pair (not two), and the velocity
    is still the average of the two directions (to float32 rounding, or bfloat16's)."""
    model = _randomised(VoxelMorph(tiny(3, int_steps=5, half_res=True, fine_features=(4,))))
    batches: list[int] = []
    for head in (model.flow, model.fine["flow"]):
        convolve = head._conv_forward
        head._conv_forward = lambda x, *rest, _convolve=convolve: batches.append(x.shape[0]) or _convolve(x, *rest)
    generator = torch.Generator().manual_seed(2)
    moving, fixed = (torch.rand(2, 1, 16, 16, 16, generator=generator) for _ in range(2))
    with torch.no_grad():
        plain = [model(moving, fixed, bf16=bf16).velocity, model(fixed, moving, bf16=bf16).velocity]
        batches.clear()
        symmetric = model(moving, fixed, symmetric=True, bf16=bf16).velocity
    assert batches == [2, 2]  # the 2 pairs, not the 4 directions (coarse head, then the fine branch's)
    tolerance = 0.02 * float(symmetric.abs().max()) if bf16 else 1e-5
    torch.testing.assert_close(symmetric, (plain[0] - plain[1]) / 2, atol=tolerance, rtol=0)


def test_symmetric_inference_needs_a_diffeomorphic_network():
    model = VoxelMorph(tiny(2, int_steps=0))
    with pytest.raises(ValueError, match="diffeomorphic"):
        model(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), symmetric=True)


def test_bfloat16_is_not_used_where_a_deepest_level_axis_keeps_one_voxel():
    """oneDNN's bfloat16 convolution returned different values on every call (some NaN) for a
    thin model grid whose last axis keeps one voxel at the deepest level: such an input runs
    in float32 (the same values as asking for float32, recorded in ``last_precision``), one
    that keeps two voxels per axis in bfloat16."""
    model = _randomised(VoxelMorph(tiny(3, int_steps=5, half_res=True, fine_features=(4,))))  # 3 levels: 8 per voxel
    thin_m, thin_f = pair((24, 24, 8))
    with torch.no_grad():
        asked = model(thin_m, thin_f, symmetric=True, bf16=True).velocity
        assert model.last_precision == "float32" and not model.bf16_suits((24, 24, 8))
        assert torch.equal(asked, model(thin_m, thin_f, symmetric=True).velocity)
        model(*pair((16, 16, 16)), bf16=True)
        assert model.last_precision == "bfloat16" and model.bf16_suits((16, 16, 9))


def test_the_shipped_network_on_a_thin_grid_gives_the_same_finite_field_every_call():
    """The case that failed (the reliability matrix's 64x64x6 scan, a 48x48x16 model grid):
    three calls asking for bfloat16 give one finite field."""
    from voxreg.nn.shipped import default_model
    from voxreg.registration.pipeline import loaded_checkpoint

    model, _ = loaded_checkpoint(default_model(3, engine="network").path, torch.device("cpu"))
    moving, fixed = pair((48, 48, 16), seed=3)
    with torch.inference_mode():
        fields = [model(moving, fixed, symmetric=True, bf16=True).field.clone() for _ in range(3)]
    assert all(bool(torch.isfinite(field).all()) for field in fields)
    assert all(torch.equal(field, fields[0]) for field in fields[1:])
