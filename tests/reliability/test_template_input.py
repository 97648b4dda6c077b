"""Reliability of ``voxreg template`` on bad input: one line naming the file, exit 2, no output."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from voxreg.cli.app import app


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def test_bad_scans_are_refused_before_any_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = [_save(tmp_path / f"good{i}.nii.gz", rng.random((16, 16)).astype(np.float32)) for i in range(2)]
    nan = rng.random((16, 16)).astype(np.float32)
    nan[3, 3] = np.nan
    cases = {
        "nan.nii.gz": [str(good[0]), str(_save(tmp_path / "nan.nii.gz", nan))],
        "vol.nii.gz is 3D": [
            str(good[0]),
            str(_save(tmp_path / "vol.nii.gz", rng.random((8, 8, 8)).astype(np.float32))),
        ],
        "empty.nii.gz": [str(good[0]), str(_save(tmp_path / "empty.nii.gz", np.zeros((16, 16), np.float32)))],
    }
    float_labels = _save(tmp_path / "labels.nii.gz", rng.random((16, 16)).astype(np.float32))
    (tmp_path / "list.csv").write_text(f"scan,labels\n{good[0]},{float_labels}\n{good[1]},\n")
    cases["labels.nii.gz"] = [str(tmp_path / "list.csv")]
    (tmp_path / "cols.csv").write_text(f"image\n{good[0]}\n{good[1]}\n")
    cases["needs a header row scan"] = [str(tmp_path / "cols.csv")]
    out = tmp_path / "out"
    for expected, args in cases.items():
        result = CliRunner().invoke(app, ["template", *args, "-o", str(out)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (expected, result.output)
        assert not out.exists()
