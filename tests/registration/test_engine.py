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
        ckpt, folder, {"name": "tiny-brain", "description": "test", "anatomy": "brain", "ndim": 3, "default": True}
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
    result = voxreg.register(fixed, moving, affine=False, metrics=False, device="cpu")
    assert result.metrics["engine"] == "network"
    assert result.metrics["model"] == str(shipped_dir / "tiny-brain.pt")
    assert result.field.shape == (1, 3, 24, 24, 24) and torch.isfinite(result.field).all()
    named = voxreg.register(fixed, moving, model="tiny-brain", affine=False, metrics=False, device="cpu")
    torch.testing.assert_close(named.field, result.field)
    instance = voxreg.register(fixed, moving, engine="instance", affine=False, metrics=False, device="cpu")
    assert instance.metrics["engine"] == "instance-optimisation" and instance.metrics["model"] is None


def test_models_command_lists_shipped_models(shipped_dir):
    out = CliRunner().invoke(app, ["models"])
    assert out.exit_code == 0
    assert "tiny-brain (default): test [3D," in out.output
    assert json.loads((shipped_dir / "tiny-brain.json").read_text(encoding="utf-8"))["anatomy"] == "brain"


def test_refine_without_a_network_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "models_dir", lambda: tmp_path)
    fixed, moving = _pair()
    with pytest.raises(VoxregError, match="--refine N refines a network's field"):
        voxreg.register(fixed, moving, refine=5, affine=False, metrics=False, device="cpu")
