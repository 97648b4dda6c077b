"""Tests of voxreg.train on tiny synthetic 3D data (16^3 warped blob phantoms)."""

from __future__ import annotations

import csv
import os
import signal

import numpy as np
import pytest
import torch

from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.synthetic import blobs_image, smooth_random_field
from voxreg.losses import gradient_penalty
from voxreg.nn import VoxelMorph, load_checkpoint
from voxreg.training import TrainConfig, TrainingInterrupted, TrainingSet, train, validate

SHAPE = (16, 16, 16)


def _scans(n: int = 8) -> tuple[list, list]:
    """``n`` smooth random warps of one blob phantom, with their label maps."""
    image, labels = blobs_image(SHAPE, seed=3, n_blobs=4)
    img = torch.from_numpy(image.array)[None, None]
    lab = torch.from_numpy(labels.array.astype(np.int64))[None, None]
    scans, maps = [], []
    for i in range(n):
        field = smooth_random_field(SHAPE, max_displacement=2.5, smoothness=10.0, seed=i)
        scans.append(image.with_array(spatial.warp(img, field)[0, 0].numpy()))
        maps.append(labels.with_array(spatial.warp(lab, field, mode="nearest")[0, 0].numpy().astype(np.int16)))
    return scans, maps


@pytest.fixture(scope="module")
def data() -> tuple[TrainingSet, TrainingSet]:
    scans, maps = _scans()
    return TrainingSet.from_images(scans[:6], maps[:6]), TrainingSet.from_images(scans[6:], maps[6:])


def _config(**kw) -> TrainConfig:
    base = dict(
        similarity="mse",
        lam=0.01,
        network="vm1",
        lr=1e-3,
        steps=40,
        batch_size=2,
        seed=1,
        checkpoint_every=10,
        validate_every=20,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    scores = [
        2 * float(((fixed == k) & (warped == k)).sum()) / float((fixed == k).sum() + (warped == k).sum())
        for k in torch.unique(fixed).tolist()
        if k != 0
    ]
    return float(np.mean(scores))


def test_training_lowers_loss_and_raises_dice(data, tmp_path):
    train_set, val_set = data
    result = train(_config(steps=100, validate_every=50), train_set, tmp_path, validation_set=val_set)
    cfg = _config()
    untrained = VoxelMorph(cfg.network_config(3))
    before_loss = validate(untrained, train_set, cfg)["val_loss"]
    after_loss = validate(result.model, train_set, cfg)["val_loss"]
    assert after_loss < 0.8 * before_loss, (before_loss, after_loss)
    moving, fixed = val_set.images[0:1], val_set.images[1:2]
    with torch.no_grad():
        field = result.model(moving, fixed).field
    warped = spatial.warp(val_set.labels[0:1].float(), field, mode="nearest").long()
    before = _dice(val_set.labels[1:2], val_set.labels[0:1])
    after = _dice(val_set.labels[1:2], warped)
    assert after > before + 0.02, (before, after)
    # outputs: metrics, plot, checkpoints
    rows = list(csv.DictReader(open(result.metrics_csv)))
    assert len(rows) == 100 and rows[-1]["step"] == "100" and rows[49]["val_dice"] != ""
    assert result.loss_plot.stat().st_size > 1000
    model, extra = load_checkpoint(result.best_checkpoint)
    assert isinstance(model, VoxelMorph) and extra["train_config"]["network"] == "vm1"
    assert extra["step"] in (50, 100) and TrainConfig.from_dict(extra["train_config"]).steps == 100


def test_resume_equals_uninterrupted_run(data, tmp_path):
    train_set, _ = data
    cfg = _config(steps=20, augment=True, checkpoint_every=5)
    straight = train(cfg, train_set, tmp_path / "a")
    first = train(_config(steps=10, augment=True, checkpoint_every=5), train_set, tmp_path / "b")
    assert first.step == 10
    resumed = train(cfg, train_set, tmp_path / "b", resume=True)
    assert resumed.step == 20
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    rows = list(csv.DictReader(open(resumed.metrics_csv)))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))


def test_resume_refuses_changed_config(data, tmp_path):
    train_set, _ = data
    train(_config(steps=2), train_set, tmp_path)
    with pytest.raises(VoxregError, match="similarity"):
        train(_config(steps=4, similarity="ncc"), train_set, tmp_path, resume=True)


def test_lambda_conditional_smoother_at_high_lambda(data, tmp_path):
    train_set, _ = data
    cfg = _config(lam_range=(1e-3, 1.0), steps=60)
    result = train(cfg, train_set, tmp_path)
    assert result.model.config.lambda_conditional
    assert all(1e-3 <= r["lambda"] <= 1.0 for r in result.history)
    moving, fixed = train_set.images[0:1], train_set.images[3:4]
    with torch.no_grad():
        low = gradient_penalty(result.model(moving, fixed, lam=1e-3).field)
        high = gradient_penalty(result.model(moving, fixed, lam=1.0).field)
    assert high < low, (float(low), float(high))


def test_sigterm_saves_last_checkpoint(data, tmp_path):
    train_set, _ = data

    def stop(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        train(_config(steps=50), train_set, tmp_path, progress=stop)
    assert info.value.step == 3
    _, extra = load_checkpoint(tmp_path / "last.pt")
    assert extra["step"] == 3 and "optimizer" in extra


def test_training_set_from_paths_resamples_and_caches(tmp_path):
    import nibabel as nib

    scans, maps = _scans(3)
    paths, label_paths = [], []
    for i, (s, m) in enumerate(zip(scans, maps)):
        paths.append(tmp_path / f"s{i}.nii.gz")
        label_paths.append(tmp_path / f"l{i}.nii.gz" if i != 1 else None)
        nib.save(nib.Nifti1Image(s.array * 100 + 5, np.eye(4)), str(paths[-1]))
        if i != 1:
            nib.save(nib.Nifti1Image(m.array, np.eye(4)), str(label_paths[-1]))
    cache = tmp_path / "cache.pt"
    ts = TrainingSet.from_paths(paths, label_paths, shape=(8, 10, 12), cache=cache)
    assert ts.images.shape == (3, 1, 8, 10, 12) and ts.images.dtype == torch.float32
    assert 0 <= float(ts.images.min()) and float(ts.images.max()) <= 1
    assert ts.labels.dtype == torch.int64 and ts.has_labels.tolist() == [True, False, True]
    assert set(torch.unique(ts.labels).tolist()) <= set(range(5))
    assert cache.is_file()
    again = TrainingSet.from_paths(paths, label_paths, shape=(8, 10, 12), cache=cache)
    assert torch.equal(again.images, ts.images)
    g = torch.Generator().manual_seed(0)
    m, f = ts.sample_pairs(16, g)
    assert bool((m != f).all())


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(similarity="cc"), "similarity"),
        (dict(lam=-1.0), "lam"),
        (dict(lam_range=(1.0, 0.1)), "lam_range"),
        (dict(network="vm3"), "network"),
        (dict(lr=0), "lr"),
        (dict(steps=0), "steps"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(device="tpu"), "device"),
        (dict(dice_weight=-1), "dice_weight"),
    ],
)
def test_bad_config_raises(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kw)


def test_config_round_trip():
    cfg = TrainConfig(lam_range=(0.01, 1.0), network="vm1", int_steps=7, half_res=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochs": 3})


def test_semi_supervised_diffeomorphic_half_res_smoke(data, tmp_path):
    train_set, val_set = data
    cfg = _config(steps=3, dice_weight=1.0, int_steps=3, half_res=True, augment=True, validate_every=3)
    result = train(cfg, train_set, tmp_path, validation_set=val_set)
    assert result.model.config.diffeomorphic and result.model.config.half_res
    assert np.isfinite(result.history[-1]["loss"]) and "val_dice" in result.history[-1]
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
