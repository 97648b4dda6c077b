"""voxreg train --init: fine-tuning starts from a checkpoint's (or shipped model's) weights."""

import pytest
import torch

from voxreg.core.errors import VoxregError
from voxreg.nn import load_checkpoint
from voxreg.training import TrainConfig, train
from voxreg.training.synth_data import SynthSource, synth_config_of


def _config(**kwargs):
    base = dict(
        synth="shapes",
        synth_shape=(16, 16, 16),
        network="vm1",
        dice_weight=1.0,
        similarity_weight=0.0,
        steps=2,
        checkpoint_every=1,
        device="cpu",
    )
    base.update(kwargs)
    return TrainConfig(**base)


def test_init_starts_from_the_given_weights(tmp_path):
    first = _config()
    train(first, SynthSource(synth_config_of(first)), tmp_path / "a")
    source, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    tuned = _config(init=str(tmp_path / "a" / "last.pt"), steps=1, lr=1e-12, seed=5)
    result = train(tuned, SynthSource(synth_config_of(tuned)), tmp_path / "b")
    for (name, a), b in zip(source.state_dict().items(), result.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    fresh = _config(steps=1, lr=1e-12, seed=5)
    other = train(fresh, SynthSource(synth_config_of(fresh)), tmp_path / "c").model
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(source.parameters(), other.parameters()))


def test_init_with_another_network_is_refused(tmp_path):
    first = _config()
    train(first, SynthSource(synth_config_of(first)), tmp_path / "a")
    other = _config(network="vm2", init=str(tmp_path / "a" / "last.pt"))
    with pytest.raises(VoxregError, match="its network differs from this training's .*dec_features"):
        train(other, SynthSource(synth_config_of(other)), tmp_path / "b")
