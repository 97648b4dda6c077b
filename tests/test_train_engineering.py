"""Training engineering: resolution schedule, scan-to-atlas, bidirectional, lr schedule,
gradient checkpointing, TensorBoard, SIGKILL + resume, and DDP via torchrun (gloo, CPU)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from test_train import _config, _scans
from voxreg.core.errors import VoxregError
from voxreg.nn import NetworkConfig, VoxelMorph, load_checkpoint
from voxreg.training import TrainConfig, TrainingSet, train
from voxreg.training.objective import Objective


@pytest.fixture(scope="module")
def train_set() -> TrainingSet:
    scans, maps = _scans(6)
    return TrainingSet.from_images(scans, maps)


def test_resolution_schedule_trains_coarse_then_full(train_set, tmp_path):
    cfg = _config(steps=8, schedule=[(0.5, 5)], checkpoint_every=4)
    assert [cfg.stage_scale(s) for s in range(8)] == [0.5] * 5 + [1.0] * 3
    result = train(cfg, train_set, tmp_path)
    assert [r["scale"] for r in result.history] == [0.5] * 5 + [1.0] * 3
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule=[(2.0, 10)])


def test_resized_set_keeps_world_positions(train_set):
    small = train_set.resized(0.5)
    assert small.images.shape == (6, 1, 8, 8, 8) and small.labels.shape == (6, 1, 8, 8, 8)
    # voxel 0 of the half-size grid covers old voxels 0 and 1: its centre is old voxel 0.5
    expected = train_set.affine @ np.array([0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(small.affine @ np.array([0, 0, 0, 1.0]), expected, atol=1e-9)
    # area averaging: the mean intensity is preserved exactly for an even factor
    assert float(small.images.mean()) == pytest.approx(float(train_set.images.mean()), abs=1e-6)


def test_scan_to_atlas_pairs_and_training(tmp_path):
    scans, maps = _scans(5)
    data = TrainingSet.from_images(scans[:4], maps[:4], atlas=scans[4], atlas_labels=maps[4])
    assert data.atlas and len(data) == 5 and bool(data.has_labels.all())
    moving, fixed = data.sample_pairs(64, torch.Generator().manual_seed(0))
    assert set(fixed.tolist()) == {4} and set(moving.tolist()) == {0, 1, 2, 3}
    assert data.validation_pairs() == [(0, 4), (1, 4), (2, 4), (3, 4)]
    result = train(_config(steps=3, validate_every=3), data, tmp_path, validation_set=data)
    assert "val_dice" in result.history[-1]


def test_bidirectional_objective_and_config(train_set, tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        TrainConfig(bidirectional=True)
    cfg = _config(bidirectional=True, int_steps=3)
    objective = Objective(cfg, 0)
    moving, fixed = train_set.images[0:1], train_set.images[1:2]
    zero = torch.zeros(1, 3, *train_set.shape)
    shift = torch.zeros_like(zero)
    shift[:, 0] = 1.0
    one_way = objective(moving, fixed, shift, torch.tensor([0.0]))[1]
    back = objective(fixed, moving, -shift, torch.tensor([0.0]))[1]
    both = objective(moving, fixed, shift, torch.tensor([0.0]), inverse=-shift)[1]
    assert float(both) == pytest.approx(0.5 * (float(one_way) + float(back)), rel=1e-6)
    assert float(objective(moving, fixed, zero, torch.tensor([0.0]), inverse=zero)[1]) == pytest.approx(
        float(((moving - fixed) ** 2).mean()), rel=1e-5
    )
    result = train(_config(steps=3, bidirectional=True, int_steps=3), train_set, tmp_path)
    assert np.isfinite(result.history[-1]["loss"])


def test_cosine_lr_schedule(train_set, tmp_path):
    result = train(_config(steps=6, lr_schedule="cosine", lr=1e-3), train_set, tmp_path)
    lrs = [r["lr"] for r in result.history]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)


def test_gradient_checkpointing_gives_the_same_gradients(train_set):
    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig.vm1(ndim=3)).train()
    moving, fixed = train_set.images[0:2], train_set.images[2:4]
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.grad_checkpoint = enabled
        model(moving, fixed).field.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0


def test_tensorboard_logging(train_set, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard (optional extra) is not installed")
    train(_config(steps=3, tensorboard=True), train_set, tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_missing_is_a_clear_error(train_set, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(VoxregError, match="tensorboard"):
        train(_config(steps=2, tensorboard=True), train_set, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_mixed_precision_on_cuda(train_set, tmp_path):
    result = train(_config(steps=4, amp=True, device="cuda"), train_set, tmp_path)
    assert all(np.isfinite(r["loss"]) for r in result.history)


def _write_scans(folder) -> list[str]:
    scans, _ = _scans(6)
    folder.mkdir()
    paths = []
    for i, scan in enumerate(scans):
        paths.append(str(folder / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(scan.array, np.eye(4)), paths[-1])
    return paths


def _train_cmd(paths: list[str], out, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "voxreg.cli",
        "train",
        *paths,
        "-o",
        str(out),
        "--steps",
        "30",
        "--network",
        "vm1",
        "--similarity",
        "mse",
        "--lambda",
        "0.01",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "5",
        "--device",
        "cpu",
        *extra,
    ]


def _steps_done(metrics) -> int:
    if not metrics.is_file():
        return 0
    with open(metrics) as fh:
        return max(0, sum(1 for _ in fh) - 1)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    paths = _write_scans(tmp_path / "scans")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    subprocess.run(_train_cmd(paths, tmp_path / "ref"), env=env, check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(paths, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _steps_done(run / "metrics.csv") < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _steps_done(run / "metrics.csv")
    saved_step = load_checkpoint(run / "last.pt")[1]["step"]
    assert 10 <= saved_step < 30 and saved_step % 5 == 0 and killed_at >= saved_step
    subprocess.run(_train_cmd(paths, run, "--resume"), env=env, check=True, capture_output=True, timeout=300)
    ref, ref_extra = load_checkpoint(tmp_path / "ref" / "last.pt")
    got, got_extra = load_checkpoint(run / "last.pt")
    assert got_extra["step"] == ref_extra["step"] == 30
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    with open(run / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == list(range(1, 31))


DDP_SCRIPT = """
import os, sys, torch
from voxreg.training import TrainConfig, TrainingSet, train
data, _ = TrainingSet.load(sys.argv[1])
cfg = TrainConfig(similarity="mse", lam=0.01, network="vm1", lr=1e-3, steps=6, batch_size=1, seed=1,
                  checkpoint_every=3, validate_every=3, device="cpu")
result = train(cfg, data, sys.argv[2])
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_ddp_two_cpu_processes_hold_identical_weights(train_set, tmp_path):
    cache = tmp_path / "data.pt"
    train_set.save(cache)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(cache),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "gloo" in proc.stderr.lower() and "network" in proc.stderr.lower():
        pytest.skip(f"gloo cannot open a loopback connection here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(1)  # the seed train() initialises the network with
    init = VoxelMorph(NetworkConfig.vm1(ndim=3)).state_dict()
    moved = 0.0
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
        moved += float((tensor - init[name]).abs().sum())
    assert moved > 0
    _, extra = load_checkpoint(out / "last.pt")
    assert extra["step"] == 6 and len(extra["rng_ranks"]) == 2
    assert not torch.equal(extra["rng_ranks"][0], extra["rng_ranks"][1])  # ranks drew different pairs
    with open(out / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 7))


def test_device_names_follow_resolve_device():
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    for bad in ("cuda:", "cuda:N", "gpu"):
        with pytest.raises(ValueError, match="device"):
            TrainConfig(device=bad)


def test_train_cli_defaults_come_from_train_config():
    import dataclasses

    import typer

    from voxreg.cli import app
    from voxreg.cli.train import _OPTION_FIELDS

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert sorted(_OPTION_FIELDS.values()) == sorted(defaults)
    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    for param, name in _OPTION_FIELDS.items():
        expected = list(defaults[name]) if name == "schedule" else defaults[name]
        if name == "fine_features":  # a comma list on the command line; no branch = no option
            expected = ",".join(map(str, expected)) or None
        assert params[param].default == expected, name
    assert "--regularizer" in params["regularizer"].opts


def test_train_cli_2d_shape_regularizer_and_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from voxreg.cli import app

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(rng.random((20, 24)).astype(np.float32), np.eye(4)), paths[-1])
    run = tmp_path / "run"
    args = [
        "train",
        *paths,
        "-o",
        str(run),
        "--steps",
        "2",
        "--network",
        "vm1",
        "--device",
        "cpu",
        "--similarity",
        "mse",
    ]
    result = CliRunner().invoke(app, [*args, "--shape", "16x16", "--regularizer", "bending"])
    assert result.exit_code == 0, result.output
    model, extra = load_checkpoint(run / "last.pt")
    assert model.config.ndim == 2 and extra["train_config"]["regularizer"] == "bending"
    for bad, fragment in (
        (["--regularizer", "l3"], "regularizer"),
        (["--shape", "16x"], "--shape"),
        (["--device", "tpu"], "device"),
    ):
        result = CliRunner().invoke(app, [*args, *bad])
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output
