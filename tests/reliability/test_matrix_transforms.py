"""Reliability matrix of bad inputs to ``transform-points`` and ``warp --inverse``.

One row per case: the command's arguments (built from the input folder and an output path),
the expected exit code and a fragment of the expected message. For every row: no traceback,
one ``voxreg: error:`` line when it fails, every input byte-for-byte unchanged (sha256) and
no output file left behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tests.conftest import Args, Case
from typer.testing import CliRunner

from voxreg.cli import app
from voxreg.core.image import Image
from voxreg.registration import outputs

runner = CliRunner()
SHAPE = (12, 12, 12)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A saved registration (reg/), its scans, and points CSVs good and bad."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    fixed = Image(rng.random(SHAPE, dtype=np.float32) + 1.0, np.eye(4))
    nib.save(nib.Nifti1Image(fixed.array, np.eye(4)), str(d / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(fixed.array, np.eye(4)), str(d / "moving.nii.gz"))
    field = torch.full((1, 3, *SHAPE), 0.5)
    world = np.eye(4)
    world[:3, 3] = [1.0, 0.0, -1.0]
    outputs.RegistrationResult(fixed, fixed, fixed, field, {}, world, {"engine": "test"}).save(d / "reg", figure=False)
    (d / "empty_folder").mkdir()
    (d / "points.csv").write_text("x,y,z,t,label\n1,2,3,0,a\n")
    (d / "no_xyz.csv").write_text("a,b,c\n1,2,3\n")
    (d / "no_z.csv").write_text("x,y\n1,2\n")
    (d / "not_number.csv").write_text("x,y,z\n1,two,3\n")
    (d / "header_only.csv").write_text("x,y,z\n")
    (d / "extra_cells.csv").write_text("x,y,z\n1,2,3,4\n")
    (d / "infinite.csv").write_text("x,y,z\n1,inf,3\n")
    (d / "binary.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    return d


# Case(id, args, exit, message): args maps (input folder, output file) to a command line


def points(csv_name: str, *extra: str, folder: str = "reg") -> Args:
    return lambda d, o: ["transform-points", str(d / folder), str(d / csv_name), "-o", str(o), *extra]


def warp(*extra: str, field: str = "reg/field.nii.gz", image: str = "fixed.nii.gz") -> Args:
    return lambda d, o: ["warp", str(d / field), str(d / image), "-o", str(o), "--device", "cpu", *extra]


CASES = [
    # transform-points: the folder
    Case("points-missing-folder", points("points.csv", folder="nowhere"), 2, "nowhere: not a folder"),
    Case("points-folder-without-field", points("points.csv", folder="empty_folder"), 2, "no field.nii.gz"),
    # transform-points: the CSV
    Case("points-missing-csv", points("missing.csv"), 2, "missing.csv: file not found"),
    Case("points-without-xyz", points("no_xyz.csv"), 2, "no_xyz.csv: a points CSV needs columns x,y,z (missing"),
    Case("points-without-z-in-3d", points("no_z.csv"), 2, "needs columns x,y,z (missing z; found x,y)"),
    Case("points-not-a-number", points("not_number.csv"), 2, "not_number.csv: line 2: y is not a number ('two')"),
    Case("points-no-rows", points("header_only.csv"), 2, "header_only.csv: no points"),
    Case("points-extra-cells", points("extra_cells.csv"), 2, "line 2 has more cells than the header"),
    Case("points-infinite", points("infinite.csv"), 2, "point coordinates must be finite numbers"),
    Case("points-binary-file", points("binary.csv"), 2, "binary.csv: cannot read as points CSV"),
    Case("points-ok", points("points.csv"), 0, "mapped 1 points (fixed -> moving, LPS mm)"),
    Case("points-ok-inverse", points("points.csv", "--inverse", "--ras"), 0, "(moving -> fixed, RAS mm)"),
    # warp --inverse
    Case("inverse-without-reference", warp("--inverse"), 2, "--inverse needs --reference MOVING"),
    Case("reference-without-inverse", warp("--reference", "{d}/moving.nii.gz"), 2, "--reference is only used"),
    Case(
        "inverse-missing-reference",
        warp("--inverse", "--reference", "{d}/nowhere.nii.gz"),
        2,
        "nowhere.nii.gz: file not found",
    ),
    Case(
        "inverse-missing-field",
        warp("--inverse", "--reference", "{d}/moving.nii.gz", field="no.nii.gz"),
        2,
        "no.nii.gz",
    ),
    Case(
        "inverse-missing-image",
        warp("--inverse", "--reference", "{d}/moving.nii.gz", image="none.nii.gz"),
        2,
        "none.nii.gz: file not found",
    ),
    Case("inverse-ok", warp("--inverse", "--reference", "{d}/moving.nii.gz"), 0, "wrote"),
]


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_transform_matrix(case: Case, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / ("mapped.csv" if case.args(inputs, tmp_path)[0] == "transform-points" else "out.nii.gz")
    args = [a.replace("{d}", str(inputs)) for a in case.args(inputs, out)]
    before = _hashes(inputs)
    result = runner.invoke(app, args)
    text = result.output
    assert result.exit_code == case.exit, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    assert case.message in " ".join(text.split()), text
    if case.exit == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("voxreg: error:")]
        assert len(errors) == 1, result.stderr
        assert not out.parent.exists() or not list(out.parent.iterdir())
    else:
        assert out.stat().st_size > 0
    assert _hashes(inputs) == before, "an input file was changed"


def test_output_onto_the_input_csv_is_refused(inputs: Path, tmp_path: Path) -> None:
    target = tmp_path / "points.csv"
    target.write_bytes((inputs / "points.csv").read_bytes())
    result = runner.invoke(app, ["transform-points", str(inputs / "reg"), str(target), "-o", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert target.read_bytes() == (inputs / "points.csv").read_bytes()
