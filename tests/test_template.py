"""``voxreg template`` (voxreg.cohort.template): an asymmetric 2D blob warped by 4 known
smooth deformations whose mean is zero must give a template closer to the undeformed blob
than the plain average; ids, resume, majority-vote labels and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from voxreg import io
from voxreg.cli.app import app
from voxreg.cohort import template as tpl
from voxreg.core import spatial

N = 48
AFFINE = np.diag([1.5, 1.5, 1.0, 1.0])


def _blob() -> np.ndarray:
    """An ellipse with four squares of different brightness (no symmetry to flip onto)."""
    y, x = np.mgrid[0:N, 0:N].astype(np.float32)
    image = 0.5 * ((((y - 24) / 17) ** 2 + ((x - 24) / 13) ** 2) < 1)
    for cy, cx, value in [(13, 18, 1.0), (16, 31, 0.8), (25, 22, 0.2), (34, 19, 0.9)]:
        image[cy - 2 : cy + 3, cx - 3 : cx + 2] = value
    return image.astype(np.float32)


def _fields() -> list[np.ndarray]:
    """Four smooth displacements (voxels, up to 2.5) whose mean is zero: f, -f, g, -g."""
    y, x = np.mgrid[0:N, 0:N].astype(np.float32)
    f = np.stack([2.5 * np.sin(4 * np.pi * y / N), 2.5 * np.sin(4 * np.pi * x / N)])
    g = np.stack([2.5 * np.cos(4 * np.pi * x / N), 2.5 * np.cos(4 * np.pi * y / N)])
    return [f, -f, g, -g]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sub-0<i>/T1.nii.gz (blob warped by field i, intensities x100) and sub-0<i>/labels.nii.gz."""
    root = tmp_path_factory.mktemp("cohort")
    blob = torch.from_numpy(_blob())[None, None]
    for i, field in enumerate(_fields()):
        warped = spatial.warp(blob, torch.from_numpy(field)[None])[0, 0].numpy()
        (root / f"sub-0{i}").mkdir()
        nib.save(nib.Nifti1Image(warped * 100, AFFINE), root / f"sub-0{i}" / "T1.nii.gz")
        labels = (warped > 0.3).astype(np.int16) + (warped > 0.7).astype(np.int16)
        nib.save(nib.Nifti1Image(labels, AFFINE), root / f"sub-0{i}" / "labels.nii.gz")
    csv = "scan,labels\n" + "".join(f"sub-0{i}/T1.nii.gz,sub-0{i}/labels.nii.gz\n" for i in range(4))
    (root / "scans.csv").write_text(csv)
    return root


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def built(cohort: Path) -> tuple[Path, tpl.TemplateResult]:
    out = cohort / "out"
    options = tpl.TemplateOptions(iterations=2, figure=False)
    return out, tpl.build_template([cohort / "scans.csv"], out, options)


def test_template_is_closer_to_the_undeformed_blob_than_the_average(cohort: Path, built) -> None:
    out, result = built
    template = nib.load(out / "template.nii.gz").get_fdata()
    average = np.mean([nib.load(cohort / f"sub-0{i}" / "T1.nii.gz").get_fdata() for i in range(4)], axis=0)
    blob = _blob()
    # measured: template 0.962, plain average 0.928, affine average (iteration 0) 0.920
    assert _corr(template, blob) > 0.95
    assert _corr(template, blob) > _corr(average, blob) + 0.01
    assert _corr(template, blob) > _corr(nib.load(out / "iter_0" / "template.nii.gz").get_fdata(), blob) + 0.02
    rows = result.convergence
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[-1]["mean_local_ncc"] > rows[0]["mean_local_ncc"]
    assert rows[2]["template_change_rms"] < rows[1]["template_change_rms"]


def test_outputs_ids_and_majority_vote_labels(built) -> None:
    out, _ = built
    for name in ("template.nii.gz", "template_labels.nii.gz", "convergence.csv", "convergence.png", "montage.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "scans").iterdir() if p.is_dir()) == [f"sub-0{i}_T1" for i in range(4)]
    assert (out / "scans" / "sub-00_T1" / "field.nii.gz").is_file()
    voted = np.asarray(nib.load(out / "template_labels.nii.gz").dataobj)
    warped = [np.asarray(nib.load(next((out / "scans" / f"sub-0{i}_T1").glob("warped_*"))).dataobj) for i in range(4)]
    assert set(np.unique(voted)) == {0, 1, 2}
    agree = np.mean([(voted == w).mean() for w in warped])
    assert agree > 0.95  # each warped map agrees with the vote on > 95 % of voxels


def test_rerun_resumes_and_continues(cohort: Path, built) -> None:
    out, _ = built
    before = (out / "iter_2" / "template.nii.gz").stat().st_mtime_ns
    result = tpl.build_template([cohort / "scans.csv"], out, tpl.TemplateOptions(iterations=3, figure=False))
    assert result.resumed_after == 2
    assert (out / "iter_2" / "template.nii.gz").stat().st_mtime_ns == before
    assert [r["iteration"] for r in result.convergence] == [0, 1, 2, 3]
    assert (out / "scans" / "sub-00_T1" / "metrics.json").read_text().count("iter_3") == 1


def test_affine_stages_are_reused_after_iteration_1(cohort: Path, built) -> None:
    """Iteration 2 and the final registrations take iteration 1's affine stages (stats.json
    records them; affine.txt of each final registration holds the same matrix); with
    refresh_affines every iteration runs its own."""
    out, _ = built
    stats = [json.loads((out / f"iter_{k}" / "stats.json").read_text(encoding="utf-8")) for k in (1, 2)]
    assert len(stats[0]["affines"]) == 4 and stats[1]["affines"] == stats[0]["affines"]
    final = io.read_itk_affine(out / "scans" / "sub-01_T1" / "affine.txt")
    np.testing.assert_allclose(final, np.asarray(stats[1]["affines"][1]), atol=1e-5)
    assert tpl._previous_affines(out, 2, tpl.TemplateOptions(refresh_affines=True), 4) is None
    assert tpl._previous_affines(out, 1, tpl.TemplateOptions(), 4) is None  # iteration 1 runs its own
    assert tpl._previous_affines(out, 2, tpl.TemplateOptions(), 5) is None  # another cohort size


def test_majority_vote_and_ids() -> None:
    maps = [np.array([[1, 2], [0, 5]]), np.array([[1, 3], [4, 5]]), np.array([[2, 3], [4, 0]])]
    assert tpl.majority_vote(maps).tolist() == [[1, 3], [4, 5]]
    paths = [Path("/d/sub-01/T1.nii.gz"), Path("/d/sub-02/T1.nii.gz"), Path("/d/other/flair.nii")]
    assert tpl.derive_ids(paths) == ["sub-01_T1", "sub-02_T1", "flair"]


def test_bad_input_one_line_exit_2_nothing_written(cohort: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("scan,id\n" + "".join(f"{cohort}/sub-0{i}/T1.nii.gz,same\n" for i in range(2)))
    cases = {
        "missing.nii.gz: file not found": [str(cohort / "sub-00" / "T1.nii.gz"), str(tmp_path / "missing.nii.gz")],
        "id same is repeated": [str(bad_csv)],
        "at least 2 scans": [str(cohort / "sub-00" / "T1.nii.gz")],
        "--iterations must be": [str(cohort / "sub-0*" / "T1.nii.gz"), "--iterations", "-1"],
        "no file matches": [str(tmp_path / "nothing*.nii.gz")],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, ["template", *args, "-o", str(out)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output
        assert not out.exists()
