"""voxreg.tune: lambda sweep of a lambda-conditional model (tiny synthetic 3D data)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from test_train import _config, _scans
from voxreg.cli import app
from voxreg.core.errors import VoxregError
from voxreg.evaluation.tune import LambdaPoint, lambda_grid, recommend, tune_lambda
from voxreg.training.trainer import TrainingSet, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    scans, maps = _scans(8)
    out = tmp_path_factory.mktemp("cond")
    train(_config(lam_range=(1e-3, 1.0), steps=60), TrainingSet.from_images(scans[:6], maps[:6]), out)
    return out / "last.pt", scans[5:], maps[5:]


def test_lambda_grid_and_recommendation():
    np.testing.assert_allclose(lambda_grid(0.01, 1.0, 3), [0.01, 0.1, 1.0])
    pts = [
        LambdaPoint(0.1, 0.80, 0.0, 2.0, 0.5, 3),
        LambdaPoint(1.0, 0.75, 0.0, 0.3, 0.3, 3),
        LambdaPoint(10.0, 0.60, 0.0, 0.0, 0.1, 3),
    ]
    assert recommend(pts, max_folding=0.5)[0] == 1.0
    assert recommend(pts, max_folding=5.0)[0] == 0.1
    lam, reason = recommend(pts, max_folding=-1.0)
    assert lam == 10.0 and "no lambda" in reason
    with pytest.raises(VoxregError):
        lambda_grid(1.0, 0.1)


def test_sweep_curve_is_smoother_at_high_lambda(trained, tmp_path):
    model, scans, maps = trained
    data = TrainingSet.from_images(scans, maps)
    result = tune_lambda(model, data, tmp_path, num=4, device="cpu")
    lams = [p.lam for p in result.points]
    np.testing.assert_allclose(lams, [1e-3, 1e-2, 1e-1, 1.0], rtol=1e-6)
    assert all(p.pairs == 3 and 0 < p.dice_mean <= 1 for p in result.points)
    # the network was trained for this: more regularisation, smoother field
    assert result.points[-1].log_jacobian_std < result.points[0].log_jacobian_std
    assert result.recommended in lams
    with open(result.csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and float(rows[0]["lambda"]) == pytest.approx(1e-3)
    assert result.plot.stat().st_size > 10_000


def test_tune_lambda_cli(trained, tmp_path):
    model, scans, maps = trained
    rows = []
    for i, (scan, lab) in enumerate(zip(scans, maps)):
        s, lab_path = tmp_path / f"s{i}.nii.gz", tmp_path / f"lab_path{i}.nii.gz"
        nib.save(nib.Nifti1Image(scan.array, np.eye(4)), str(s))
        nib.save(nib.Nifti1Image(lab.array, np.eye(4)), str(lab_path))
        rows.append(f"{s.name},{lab_path.name}")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "sweep"
    res = CliRunner().invoke(
        app,
        [
            "tune-lambda",
            str(model),
            str(tmp_path / "val.csv"),
            "-o",
            str(out),
            "--lambdas",
            "0.01,0.1,1",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "recommended lambda" in res.output
    assert (out / "lambda_curve.png").is_file() and (out / "lambda_curve.csv").is_file()
    bad = CliRunner().invoke(
        app, ["tune-lambda", str(model), str(tmp_path / "val.csv"), "-o", str(out), "--lambdas", "a,b"]
    )
    assert bad.exit_code == 2 and "--lambdas" in bad.output


def test_non_conditional_model_is_refused(tmp_path):
    scans, maps = _scans(4)
    data = TrainingSet.from_images(scans, maps)
    result = train(_config(steps=2), data, tmp_path / "run")
    with pytest.raises(VoxregError, match="lambda-conditional"):
        tune_lambda(result.last_checkpoint, data, tmp_path / "out", device="cpu")
