"""nn.shipped: exporting a checkpoint as a shipped model and finding it again."""

import json

import pytest
import torch

from voxreg.core.errors import VoxregError
from voxreg.nn import NetworkConfig, VoxelMorph, load_checkpoint, save_checkpoint
from voxreg.nn.shipped import export_shipped, find_shipped, shipped_models


def test_export_half_precision_and_list(tmp_path):
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig.vm1(ndim=3))
    source = save_checkpoint(
        tmp_path / "last.pt",
        model,
        {"model_space": {"voxel_size": [2.0] * 3, "ndim": 3}, "optimizer": {"big": torch.zeros(1000)}, "step": 7},
    )
    card = {"name": "tiny", "description": "test", "anatomy": "any", "ndim": 3}
    path = export_shipped(source, tmp_path / "models", card)
    assert path.stat().st_size < 0.75 * source.stat().st_size  # fp16, no optimiser state
    loaded, extra = load_checkpoint(path)
    assert set(extra) == {"model_space", "step"}
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32, name
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)
    [shipped] = shipped_models(tmp_path / "models")
    assert (
        shipped.name,
        shipped.ndim,
        json.loads((tmp_path / "models" / "tiny.json").read_text(encoding="utf-8")),
    ) == (
        "tiny",
        3,
        card,
    )
    assert find_shipped("tiny", tmp_path / "models").path == path
    with pytest.raises(VoxregError, match=r"no shipped model named 'brain' \(shipped: tiny\)"):
        find_shipped("brain", tmp_path / "models")


def test_card_without_required_keys_is_refused(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    (tmp_path / "m.json").write_text(json.dumps({"name": "m"}))
    with pytest.raises(VoxregError, match="model card misses description, anatomy, ndim"):
        shipped_models(tmp_path)
