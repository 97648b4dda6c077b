"""voxreg register-batch (voxreg.registration.batch): outputs per pair, resume, failures, torchrun split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from voxreg.cli import app
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.io import save_image, tables
from voxreg.registration import batch, pipeline
from voxreg.registration.batch import BatchPair, is_complete, read_pairs, run_batch, shard

FAST = {"engine": "instance", "affine": False, "figure": False}


def _blob(shift: int, seed: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(16.0)] * 3, indexing="ij"))
    centre = np.array([7.5 + shift, 7.5, 7.5])[:, None, None, None]
    blob = np.exp(-((grid - centre) ** 2).sum(0) / (2 * 3.0**2))
    return (blob + 0.05 * np.random.default_rng(seed).random((16,) * 3)).astype(np.float32)


@pytest.fixture
def pair_list(tmp_path):
    """Three 16^3 pairs with labels, listed in pairs.csv (relative paths)."""
    data = tmp_path / "data"
    data.mkdir()
    lines = ["fixed,moving,fixed_labels,moving_labels,id"]
    for index in range(3):
        for role, shift in (("f", 0), ("m", 1)):
            image = _blob(shift, index * 2 + shift)
            save_image(Image(image, np.eye(4)), data / f"{role}{index}.nii.gz")
            save_image(Image((image > 0.5).astype(np.int16), np.eye(4)), data / f"{role}{index}_lab.nii.gz")
        lines.append(
            f"data/f{index}.nii.gz,data/m{index}.nii.gz,data/f{index}_lab.nii.gz,data/m{index}_lab.nii.gz,p{index}"
        )
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _counting(monkeypatch):
    calls = []

    def register(fixed, moving, **kwargs):
        calls.append(str(moving.path))
        kwargs.setdefault("config", pipeline.AlignConfig(iterations=(5, 3, 2)))
        return pipeline.register(fixed, moving, **kwargs)

    return calls, register


def test_outputs_per_pair_and_table(pair_list, tmp_path, monkeypatch):
    calls, register = _counting(monkeypatch)
    out = tmp_path / "out"
    summary = run_batch(pair_list, out, register=register, workers=2, **FAST)
    assert summary.failed == 0 and summary.count("ok") == 3 and len(calls) == 3
    for index in range(3):
        folder = out / f"p{index}"
        assert is_complete(folder)
        assert {"warped.nii.gz", "field.nii.gz", "metrics.json", "warped_m0_lab.nii.gz".replace("0", str(index))} <= {
            p.name for p in folder.iterdir()
        }
        assert not any(p.name.startswith(".voxreg") for p in folder.iterdir())
    rows = tables.read_table(out / "batch.csv")
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert all(r["status"] == "ok" and float(r["dice"]) > 0.5 and float(r["seconds"]) > 0 for r in rows)
    assert "pairs/min" in summary.line()


def test_resume_skips_finished_pairs(pair_list, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls, register = _counting(monkeypatch)
    run_batch(pair_list, out, register=register, workers=0, **FAST)
    assert len(calls) == 3
    (out / "p1" / "warped.nii.gz").unlink()  # a kill between the renames: metrics.json alone is not complete
    calls.clear()
    summary = run_batch(pair_list, out, register=register, workers=2, **FAST)
    assert calls == [str(pair_list.parent / "data" / "m1.nii.gz")]
    assert [r["status"] for r in summary.rows] == ["skipped", "skipped", "ok"]
    rows = tables.read_table(out / "batch.csv")
    assert [r["status"] for r in rows] == ["skipped", "ok", "skipped"] and all(r["dice"] for r in rows)


def test_a_bad_pair_is_recorded_and_the_others_succeed(pair_list, tmp_path, monkeypatch):
    text = pair_list.read_text().replace("data/m1.nii.gz", "data/missing.nii.gz")
    pair_list.write_text(text)
    out = tmp_path / "out"
    calls, register = _counting(monkeypatch)
    summary = run_batch(pair_list, out, register=register, **FAST)
    assert summary.failed == 1 and summary.count("ok") == 2
    rows = {r["id"]: r for r in tables.read_table(out / "batch.csv")}
    assert rows["p1"]["status"] == "failed" and "missing.nii.gz" in rows["p1"]["error"]
    assert not (out / "p1").exists() and is_complete(out / "p0") and is_complete(out / "p2")


def test_failure_inside_registration_is_recorded(pair_list, tmp_path):
    def register(fixed, moving, **kwargs):
        if "m0" in str(moving.path):
            raise VoxregError("registration failed: the field contains NaN/Inf")
        return pipeline.register(fixed, moving, config=pipeline.AlignConfig(iterations=(3, 2, 1)), **kwargs)

    summary = run_batch(pair_list, tmp_path / "out", register=register, **FAST)
    assert [r["status"] for r in summary.rows] == ["failed", "ok", "ok"]
    assert "NaN" in summary.rows[0]["error"]


def test_torchrun_split_by_rank(pair_list, tmp_path, monkeypatch):
    pairs = [BatchPair(f"q{i}", tmp_path / "f", tmp_path / "m") for i in range(7)]
    assert [p.id for p in shard(pairs, 1, 3)] == ["q1", "q4"]
    out = tmp_path / "out"
    taken = {}
    for rank in (1, 0):  # rank 0 finishes last and merges everything
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        calls, register = _counting(monkeypatch)
        summary = run_batch(pair_list, out, register=register, **FAST)
        taken[rank] = [r["id"] for r in summary.rows]
        assert summary.rank == rank and summary.world == 2
        if rank == 1:  # rank 0 has not run yet: its pairs are pending
            assert [r["status"] for r in tables.read_table(out / "batch.csv")] == ["pending", "ok", "pending"]
    assert taken == {0: ["p0", "p2"], 1: ["p1"]}
    assert [r["status"] for r in tables.read_table(out / "batch.csv")] == ["ok", "ok", "ok"]
    assert (out / "batch.rank0.csv").is_file() and (out / "batch.rank1.csv").is_file()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(VoxregError, match="RANK"):
        batch.rank_and_world()


def test_pair_list_errors(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("fixed,moving,fixed_labels\na.nii.gz,b.nii.gz,c.nii.gz\n")
    with pytest.raises(VoxregError, match="both fixed_labels and moving_labels"):
        read_pairs(path)
    path.write_text("fixed\na.nii.gz\n")
    with pytest.raises(VoxregError, match="fixed,moving"):
        read_pairs(path)
    path.write_text("fixed,moving,id\na,b,x\nc,d,x\n")
    with pytest.raises(VoxregError, match="repeated"):
        read_pairs(path)
    path.write_text("fixed,moving,id\na,b,../x\n")
    with pytest.raises(VoxregError, match="plain folder name"):
        read_pairs(path)
    path.write_text("fixed,moving\na,b\n")
    assert read_pairs(path) == [BatchPair("0001", tmp_path / "a", tmp_path / "b")]


def test_cli_register_batch_without_inverse_and_itk(pair_list, tmp_path):
    out = tmp_path / "out"
    args = ["register-batch", str(pair_list), "-o", str(out), "--engine", "instance", "--no-affine", "--no-figure"]
    result = CliRunner().invoke(app, [*args, "--no-inverse", "--no-itk", "--no-report"])
    assert result.exit_code == 0, result.output
    for pair in ("p0", "p1", "p2"):
        values = json.loads((out / pair / "metrics.json").read_text())
        written = sorted(p.name for p in (out / pair).iterdir())
        assert written == sorted(values["outputs"])
        assert written == ["field.nii.gz", "metrics.json", "warped.nii.gz", f"warped_m{pair[1]}_lab.nii.gz"]
        assert is_complete(out / pair)


def test_cli_register_batch_exit_codes(pair_list, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["register-batch", str(pair_list), "-o", str(out), "--engine", "instance", "--no-affine", "--no-figure"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "p0" / "metrics.json").read_text())["engine"] == "instance-optimisation"
    pair_list.write_text(pair_list.read_text().replace("data/f2.nii.gz", "data/nope.nii.gz"))
    result = runner.invoke(app, [*args[:3], str(tmp_path / "out2"), *args[4:]])
    assert result.exit_code == 2
    assert "1 failed" in result.output
