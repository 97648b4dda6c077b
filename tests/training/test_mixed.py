"""Synthetic label-map pairs mixed with real scan pairs in one training run
(``voxreg train SCANS --synth SOURCES --synth-fraction F``)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from voxreg.cli import app
from voxreg.core.synthetic import blobs_image
from voxreg.io import save_image
from voxreg.training import TrainConfig, TrainingSet, train
from voxreg.training.synth_data import MixedSource, SynthSource, synth_config_of

runner = CliRunner()
SHAPE = (16, 16, 16)


def _config(**kwargs):
    base = dict(
        synth="shapes",
        synth_shape=SHAPE,
        synth_fraction=0.5,
        network="vm1",
        dice_weight=1.0,
        similarity_weight=1.0,
        lam=0.5,
        steps=12,
        checkpoint_every=100,
        device="cpu",
        seed=3,
    )
    base.update(kwargs)
    return TrainConfig(**base)


def _real_scans(count=3):
    return TrainingSet.from_images([blobs_image(SHAPE, seed=s)[0] for s in range(count)])


def _mixed(config):
    return MixedSource(_real_scans(), SynthSource(synth_config_of(config)), config.synth_fraction)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_mixed_source_draws_synthetic_pairs_at_the_given_fraction(fraction):
    source = _mixed(_config(synth_fraction=fraction))
    generator = torch.Generator().manual_seed(0)
    share = np.mean([source.draws_synthetic(generator) for _ in range(2000)])
    assert abs(share - fraction) < 0.03  # binomial sd at 0.3: 0.010


def test_only_synthetic_steps_add_the_dice_term(tmp_path):
    # loss = similarity + lambda * regulariser (+ Dice on the synthetic label maps): a real pair
    # (no labels) gives exactly the first two terms, a synthetic one adds a Dice loss > 0
    config = _config()
    result = train(config, _mixed(config), tmp_path / "run")
    extra = np.array([row["loss"] - row["similarity"] - config.lam * row["regularizer"] for row in result.history])
    real, synthetic = np.abs(extra) < 1e-5, extra > 1e-3
    assert (real | synthetic).all(), extra
    assert real.sum() >= 2 and synthetic.sum() >= 2, extra  # both kinds in 12 steps at 0.5


def test_synth_fraction_needs_synthetic_sources_and_stays_within_zero_and_one():
    with pytest.raises(ValueError, match="synth_fraction"):
        TrainConfig(synth_fraction=0.5)
    with pytest.raises(ValueError, match="synth_fraction"):
        TrainConfig(synth="shapes", synth_fraction=1.5)
    assert TrainConfig.from_dict(_config().to_dict()).synth_fraction == 0.5


def test_cli_mixes_scans_with_synthetic_pairs_and_refuses_bad_mixes(tmp_path):
    scans = []
    for seed in range(3):
        path = tmp_path / f"scan{seed}.nii.gz"
        save_image(blobs_image(SHAPE, seed=seed)[0], path)
        scans.append(str(path))
    common = ["train", *scans, "--network", "vm1", "--dice-weight", "1", "--synth-shape", "16x16x16"]
    common += ["--steps", "2", "--device", "cpu"]
    done = runner.invoke(app, [*common, "--synth", "shapes", "--synth-fraction", "0.5", "-o", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "a" / "last.pt").is_file()
    no_synth = runner.invoke(app, [*common, "--synth-fraction", "0.5", "-o", str(tmp_path / "b")])
    assert no_synth.exit_code == 2 and "--synth-fraction < 1 mixes" in no_synth.output
    user = runner.invoke(app, [*common, "--synth", "user", "--synth-fraction", "0.5", "-o", str(tmp_path / "c")])
    assert user.exit_code == 2 and "drop the 'user' source" in user.output
    assert "Traceback" not in no_synth.output + user.output
