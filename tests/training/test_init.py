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


def test_cli_fine_tunes_the_shipped_model_in_its_own_network_and_space(tmp_path):
    """`voxreg train SCANS --init brain`: no network options needed; the scans (1.5 mm) are
    resampled to the model's 2.07 mm space, and the result registers with --model."""
    import numpy as np
    from typer.testing import CliRunner

    from voxreg.cli import app
    from voxreg.core.image import Image
    from voxreg.io import save_image
    from voxreg.nn.shipped import find_shipped

    brain = find_shipped("brain")
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = []
    for i in range(2):
        volume = np.zeros((40, 44, 36), np.float32)
        volume[8 + i : 30 + i, 10:34, 6:30] = 1.0
        volume += 0.05 * rng.random(volume.shape).astype(np.float32)
        paths.append(str(save_image(Image(volume, affine), tmp_path / f"s{i}.nii.gz")))
    out = CliRunner().invoke(
        app, ["train", *paths, "--init", "brain", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "run")]
    )
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())  # rich wraps long lines
    assert "--init brain: network vm2, half-res True, int-steps 5, model space 2.07 mm voxels" in said
    model, extra = load_checkpoint(tmp_path / "run" / "last.pt")
    shipped, _ = load_checkpoint(brain.path)
    assert model.config.to_dict() == shipped.config.to_dict()
    assert extra["model_space"]["voxel_size"] == [2.07] * 3
    # 40 x 1.5 mm = 60 mm -> 29 voxels of 2.07 mm; 44 -> 32; 36 -> 26
    assert extra["train_config"]["voxel_size"] == 2.07
    registered = CliRunner().invoke(
        app, ["register", paths[0], paths[1], "--model", str(tmp_path / "run" / "last.pt"), "-o", str(tmp_path / "reg")]
    )
    assert registered.exit_code == 0, registered.output


def test_training_set_at_a_voxel_size_covers_the_same_extent():
    import numpy as np

    from voxreg.core.image import Image
    from voxreg.training import TrainingSet

    scans = [
        Image(np.random.default_rng(i).random((40, 44, 36)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1]))
        for i in range(2)
    ]
    data = TrainingSet.from_images(scans, voxel_size=2.07)
    assert data.shape == (29, 32, 26)  # round(60 / 2.07), round(66 / 2.07), round(54 / 2.07)


def test_init_widens_a_half_res_model_with_a_fine_branch(tmp_path):
    """--init of a half-res checkpoint with fine_features: every coarse weight is the source's,
    the fine branch is new and the saved checkpoint records it; a fine checkpoint then
    resumes as init with its branch (adopted)."""
    from voxreg.training.trainer import adopt_initial_network

    first = _config(half_res=True)
    train(first, SynthSource(synth_config_of(first)), tmp_path / "a")
    source, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    widened = _config(half_res=True, fine_features=(4,), init=str(tmp_path / "a" / "last.pt"), steps=1, lr=1e-12)
    model = train(widened, SynthSource(synth_config_of(widened)), tmp_path / "b").model
    state = model.state_dict()
    for name, a in source.state_dict().items():
        torch.testing.assert_close(state[name], a, rtol=0, atol=1e-6, msg=name)
    assert {n for n in state if n not in source.state_dict()} == {
        "fine.blocks.0.conv.weight",
        "fine.blocks.0.conv.bias",
        "fine.flow.weight",
        "fine.flow.bias",
    }
    saved, _ = load_checkpoint(tmp_path / "b" / "last.pt")
    assert saved.config.fine_features == (4,)
    adopted, note = adopt_initial_network(_config(init=str(tmp_path / "b" / "last.pt")))
    assert adopted.half_res and adopted.fine_features == (4,) and "fine branch 4" in note
    with pytest.raises(ValueError, match="fine_features refine a half-resolution field"):
        _config(fine_features=(4,))


def test_a_run_started_with_init_resumes_without_it(tmp_path):
    """`voxreg train ... --init X` then `voxreg train ... --resume` (no --init): init and the
    adopted voxel size come from last.pt, so the resume check passes and the run continues."""
    from voxreg.training.trainer import adopt_resumed_run

    first = _config()
    train(first, SynthSource(synth_config_of(first)), tmp_path / "a")
    started = _config(init=str(tmp_path / "a" / "last.pt"), voxel_size=2.0)
    train(started, SynthSource(synth_config_of(started)), tmp_path / "b")
    resumed = adopt_resumed_run(_config(steps=3), tmp_path / "b")
    assert (resumed.init, resumed.voxel_size) == (started.init, 2.0)
    result = train(resumed, SynthSource(synth_config_of(resumed)), tmp_path / "b", resume=True)
    assert result.step == 3
    with pytest.raises(VoxregError, match="cannot resume"):
        train(_config(steps=4), SynthSource(synth_config_of(_config())), tmp_path / "b", resume=True)
    assert adopt_resumed_run(_config(), tmp_path / "missing") == _config()
