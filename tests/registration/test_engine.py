"""Engine choice and shipped models in voxreg.register / the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import voxreg
from voxreg.cli import app
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.nn import NetworkConfig, VoxelMorph, save_checkpoint
from voxreg.nn import shipped as shipped_module
from voxreg.nn.shipped import export_shipped
from voxreg.registration.pipeline import resolve_model


def _pair(spacing=1.0):
    coords = np.meshgrid(*[np.arange(24) * spacing] * 3, indexing="ij")
    centre = 11.5 * spacing
    blob = np.exp(-sum((c - centre) ** 2 for c in coords) / (2 * (5 * spacing) ** 2)).astype(np.float32)
    moved = np.roll(blob, 1, axis=0)
    affine = np.diag([spacing] * 3 + [1.0])
    return Image(blob, affine), Image(moved, affine)


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig.vm1(ndim=3))
    ckpt = save_checkpoint(
        tmp_path / "c.pt", model, {"model_space": {"voxel_size": [2.0] * 3, "ndim": 3, "multiple": 8}}
    )
    folder = tmp_path / "models"
    export_shipped(
        ckpt,
        folder,
        {
            "name": "tiny-brain",
            "description": "test",
            "anatomy": "brain",
            "ndim": 3,
            "default": True,
            "refine": 3,
            "covers": {"max_spacing_mm": 4.3, "max_extent_mm": 100.0, "inputs_measured": "blobs and heads"},
        },
    )
    monkeypatch.setattr(shipped_module, "models_dir", lambda: folder)
    return folder


def test_engine_choices_without_shipped_models(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "models_dir", lambda: tmp_path)
    assert resolve_model(None, "auto", 3) is None
    assert resolve_model(None, "instance", 3) is None
    with pytest.raises(VoxregError, match="no shipped model registers 3D scans"):
        resolve_model(None, "network", 3)
    with pytest.raises(VoxregError, match="--engine instance and --model contradict"):
        resolve_model("x.pt", "instance", 3)
    with pytest.raises(VoxregError, match="engine must be one of auto, network, instance"):
        resolve_model(None, "fast", 3)
    with pytest.raises(VoxregError, match="no shipped model named 'brain'"):
        resolve_model("brain", "auto", 3)


def test_auto_uses_the_default_shipped_model_in_its_space(shipped_dir):
    fixed, moving = _pair()
    assert resolve_model(None, "auto", 3) == shipped_dir / "tiny-brain.pt"
    assert resolve_model(None, "auto", 2) is None  # 2D falls back to instance optimisation
    result = voxreg.register(fixed, moving, refine=0, affine=False, metrics=False, device="cpu")
    assert result.metrics["engine"] == "network"
    assert result.metrics["model"] == str(shipped_dir / "tiny-brain.pt")
    assert result.metrics["engine_reason"] == "shipped model tiny-brain"
    assert result.field.shape == (1, 3, 24, 24, 24) and torch.isfinite(result.field).all()
    named = voxreg.register(fixed, moving, model="tiny-brain", refine=0, affine=False, metrics=False, device="cpu")
    torch.testing.assert_close(named.field, result.field)
    instance = voxreg.register(fixed, moving, engine="instance", affine=False, metrics=False, device="cpu")
    assert instance.metrics["engine"] == "instance-optimisation" and instance.metrics["model"] is None


def test_models_command_lists_shipped_models(shipped_dir):
    out = CliRunner().invoke(app, ["models"])
    assert out.exit_code == 0
    assert "tiny-brain (default): test [3D," in out.output
    assert "used by default for voxels up to 4.3 mm and fields of view up to 100 mm" in out.output
    assert "inputs measured: blobs and heads" in out.output
    assert json.loads((shipped_dir / "tiny-brain.json").read_text(encoding="utf-8"))["anatomy"] == "brain"


def test_refine_without_a_network_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "models_dir", lambda: tmp_path)
    fixed, moving = _pair()
    with pytest.raises(VoxregError, match="--refine N refines a network's field"):
        voxreg.register(fixed, moving, refine=5, affine=False, metrics=False, device="cpu")


def test_the_default_refines_the_shipped_model_by_its_card(shipped_dir, tmp_path):
    fixed, moving = _pair()
    default = voxreg.register(fixed, moving, affine=False, metrics=False, device="cpu")
    assert default.metrics["engine"] == "network+refine3"  # the card's "refine": 3
    by_name = voxreg.register(fixed, moving, model="tiny-brain", affine=False, metrics=False, device="cpu")
    assert by_name.metrics["engine"] == "network+refine3"
    # a checkpoint file given by path is not refined unless asked
    by_path = voxreg.register(
        fixed, moving, model=shipped_dir / "tiny-brain.pt", affine=False, metrics=False, device="cpu"
    )
    assert by_path.metrics["engine"] == "network"
    asked = voxreg.register(
        fixed, moving, model=shipped_dir / "tiny-brain.pt", refine=2, affine=False, metrics=False, device="cpu"
    )
    assert asked.metrics["engine"] == "network+refine2"


def test_the_refinement_takes_the_cards_lambda_unless_the_user_gives_one(shipped_dir):
    """Card ``refine_lambda`` 0.5: the default's refinement optimises with λ 0.5 (as if
    ``--lambda 0.5`` were given: the same field); --lambda, another similarity, a network
    alone and instance optimisation keep their own λ."""
    card_path = shipped_dir / "tiny-brain.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card_path.write_text(json.dumps(card | {"refine_lambda": 0.5}), encoding="utf-8")
    fixed, moving = _pair()
    run = {"affine": False, "metrics": False, "device": "cpu"}
    default = voxreg.register(fixed, moving, **run)
    assert default.metrics["engine"] == "network+refine3" and default.metrics["lambda"] == 0.5
    explicit = voxreg.register(fixed, moving, lam=0.5, **run)
    torch.testing.assert_close(default.field, explicit.field)
    assert voxreg.register(fixed, moving, lam=2.0, **run).metrics["lambda"] == 2.0
    assert not torch.allclose(voxreg.register(fixed, moving, lam=2.0, **run).field, default.field)
    assert voxreg.register(fixed, moving, similarity="mse", **run).metrics["lambda"] == 0.02  # mse's default
    assert voxreg.register(fixed, moving, engine="instance", **run).metrics["lambda"] == 1.0
    assert voxreg.register(fixed, moving, refine=0, **run).metrics["lambda"] is None  # network alone: none


def test_refinement_splits_steps_four_to_one_between_half_and_full_scale():
    from voxreg.registration.instance import AlignConfig

    assert AlignConfig().refinement(25).iterations == (20, 5)
    assert AlignConfig().refinement(25).scales == (2, 1)
    assert AlignConfig().refinement(3).iterations == (2, 1)
    assert AlignConfig().refinement(1).iterations == (0, 1)


@pytest.mark.parametrize(
    "spacing, reason",
    [
        ((1.0, 1.0, 6.0), "voxels of 6 mm are coarser than the 4.3 mm it covers"),  # thick slices
        ((1.0, 1.0, 4.5), "voxels of 4.5 mm are coarser than the 4.3 mm it covers"),
        ((1.0, 1.0, 4.2), "a 101 mm field of view is wider than the 100 mm it covers"),  # 24 x 4.2 mm
    ],
)
def test_auto_falls_back_to_instance_when_the_shipped_model_does_not_cover_the_scans(shipped_dir, spacing, reason):
    fixed, moving = _pair()
    affine = np.diag([*spacing, 1.0])
    fixed, moving = Image(fixed.array, affine), Image(moving.array, affine)
    result = voxreg.register(fixed, moving, affine=False, metrics=False, device="cpu")
    assert result.metrics["engine"] == "instance-optimisation"
    assert result.metrics["engine_reason"] == f"shipped model tiny-brain not used: {reason}"
    # asked for by name, the model runs anyway (the user knows the scans)
    named = voxreg.register(fixed, moving, model="tiny-brain", refine=0, affine=False, metrics=False, device="cpu")
    assert named.metrics["engine"] == "network" and named.metrics["engine_reason"] == "shipped model tiny-brain"
    with pytest.raises(VoxregError, match="no network runs \\(shipped model tiny-brain not used"):
        voxreg.register(fixed, moving, refine=4, affine=False, metrics=False, device="cpu")


def test_a_scan_at_the_covered_limits_uses_the_model(shipped_dir):
    fixed, moving = _pair(spacing=4.0)  # 24 x 4 mm = 96 mm field of view, 4 mm voxels: covered
    result = voxreg.register(fixed, moving, affine=False, metrics=False, device="cpu")
    assert result.metrics["engine"] == "network+refine3"
    assert result.metrics["engine_reason"] == "shipped model tiny-brain"


def test_a_network_alone_makes_the_affine_aligned_moving_scan_only_when_asked(shipped_dir):
    from voxreg import io

    fixed, moving = _pair()
    world_matrix = np.eye(4)
    world_matrix[:3, 3] = [1.0, -2.0, 0.5]
    result = voxreg.register(fixed, moving, refine=0, world_matrix=world_matrix, metrics=False, device="cpu")
    assert result.metrics["engine"] == "network"
    assert result.moving_source.cache_info().currsize == 0  # not made: nothing needed it
    expected = io.resample_to(moving, fixed, world_matrix)
    np.testing.assert_allclose(result.moving.array, expected.array, atol=1e-6)
    assert result.moving is result.moving  # made once, then kept
    instance = voxreg.register(fixed, moving, engine="instance", world_matrix=world_matrix, metrics=False)
    assert instance.moving_source.cache_info().currsize == 1  # instance optimisation needed it


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_field_with_one_non_finite_value_fails_in_one_line(bad, monkeypatch):
    from voxreg.registration import pipeline

    def broken_field(pair, *args, **kwargs):
        field = torch.zeros(1, 3, *pair.fixed.shape)
        field[0, 1, 3, 4, 5] = bad
        return "network", field, None, {}

    monkeypatch.setattr(pipeline, "_estimate_field", broken_field)
    fixed, moving = _pair()
    with pytest.raises(VoxregError, match="the network field contains NaN/Inf"):
        voxreg.register(fixed, moving, affine=False, metrics=False, engine="instance")


def test_the_cards_symmetric_inference_runs_the_network_both_ways(tmp_path, monkeypatch):
    """Card ``symmetric_inference``: the network alone averages v(M->F) and -v(F->M)
    (metrics.json says so; the same field as ``symmetric=True``), ``symmetric=False``
    overrides it, and a card without the key runs the network one way."""
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig.vm1(ndim=3, int_steps=5))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    ckpt = save_checkpoint(
        tmp_path / "c.pt", model, {"model_space": {"voxel_size": [2.0] * 3, "ndim": 3, "multiple": 8}}
    )
    card = {"name": "tiny-brain", "description": "test", "anatomy": "brain", "ndim": 3, "default": True}
    card |= {"refine": 0, "covers": {"max_spacing_mm": 4.3, "max_extent_mm": 100.0}}
    folder = tmp_path / "models"
    export_shipped(ckpt, folder, card | {"symmetric_inference": True})
    monkeypatch.setattr(shipped_module, "models_dir", lambda: folder)
    fixed, moving = _pair()
    run = {"affine": False, "metrics": False, "device": "cpu"}
    by_card = voxreg.register(fixed, moving, **run)
    assert by_card.metrics["engine"] == "network" and by_card.metrics["symmetric_inference"] is True
    torch.testing.assert_close(by_card.field, voxreg.register(fixed, moving, symmetric=True, **run).field)
    one_way = voxreg.register(fixed, moving, symmetric=False, **run)
    assert "symmetric_inference" not in one_way.metrics
    assert float((by_card.field - one_way.field).abs().max()) > 1e-3
    export_shipped(ckpt, folder, card)  # the same network, a card without the key
    plain = voxreg.register(fixed, moving, **run)
    assert "symmetric_inference" not in plain.metrics
    torch.testing.assert_close(plain.field, one_way.field)
    displacement = tmp_path / "displacement.pt"  # a network without velocity: refused in one line
    save_checkpoint(displacement, VoxelMorph(NetworkConfig.vm1(ndim=3)), {})
    with pytest.raises(VoxregError, match="symmetric inference needs a diffeomorphic"):
        voxreg.register(fixed, moving, model=displacement, symmetric=True, **run)


def test_engine_network_runs_the_card_that_is_the_network_default(shipped_dir):
    """A second card with ``network_default``: ``--engine network`` (and evaluate's network
    method) run it, the default engine keeps the ``default`` card and its refinement; without
    such a card ``--engine network`` runs the default card."""
    assert resolve_model(None, "network", 3).name == "tiny-brain.pt"
    export_shipped(
        shipped_dir / "tiny-brain.pt",
        shipped_dir,
        {"name": "tiny-real", "description": "alone", "anatomy": "brain", "ndim": 3, "network_default": True},
    )
    assert resolve_model(None, "network", 3).name == "tiny-real.pt"
    assert resolve_model(None, "auto", 3).name == "tiny-brain.pt"
    fixed, moving = _pair()
    run = {"affine": False, "metrics": False, "device": "cpu"}
    alone = voxreg.register(fixed, moving, engine="network", **run)
    assert alone.metrics["engine"] == "network" and alone.metrics["model"].endswith("tiny-real.pt")
    default = voxreg.register(fixed, moving, **run)
    assert default.metrics["engine"] == "network+refine3" and default.metrics["model"].endswith("tiny-brain.pt")
    listing = CliRunner().invoke(app, ["models"]).output
    assert "tiny-real (default of --engine network): alone" in listing and "tiny-brain (default): test" in listing


def test_metrics_say_in_which_precision_the_network_ran(tmp_path, monkeypatch):
    """``network_precision`` in metrics.json: the network's field in bfloat16 autocast is
    within 2 % of the float32 one (not bit-equal: the convs did run in bf16), the refinement
    after it records it too, and instance optimisation (no network) does not."""
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig.vm1(ndim=3, int_steps=5))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.05)  # a field of ~0.3 voxel
    ckpt = save_checkpoint(
        tmp_path / "c.pt", model, {"model_space": {"voxel_size": [2.0] * 3, "ndim": 3, "multiple": 8}}
    )
    fixed, moving = _pair()
    run = {"affine": False, "metrics": False, "device": "cpu", "model": ckpt}
    fields = {}
    for precision in ("float32", "bfloat16"):
        monkeypatch.setenv("VOXREG_NETWORK_PRECISION", precision)
        result = voxreg.register(fixed, moving, refine=0, **run)
        assert result.metrics["engine"] == "network" and result.metrics["network_precision"] == precision
        fields[precision] = result.field
    scale = float(fields["float32"].abs().max())
    difference = float((fields["bfloat16"] - fields["float32"]).abs().max())
    assert scale > 0.1 and 0 < difference < 0.02 * scale
    refined = voxreg.register(fixed, moving, refine=2, **run)
    assert refined.metrics["engine"] == "network+refine2" and refined.metrics["network_precision"] == "bfloat16"
    alone = voxreg.register(fixed, moving, affine=False, metrics=False, engine="instance", device="cpu")
    assert "network_precision" not in alone.metrics
