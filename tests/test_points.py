"""``voxreg transform-points`` and :mod:`voxreg.cohort.points`: points through a saved
registration, fixed -> moving (as antsApplyTransformsToPoints with the forward list) and back,
checked by hand and against antspyx on the same files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from tests.conftest import smooth_volume
from typer.testing import CliRunner

from voxreg import io
from voxreg.cli import app
from voxreg.cohort import points as pts
from voxreg.core.grid import apply_matrix
from voxreg.core.image import Image
from voxreg.core.synthetic import smooth_random_field
from voxreg.evaluation import methods
from voxreg.registration import outputs, pipeline

runner = CliRunner()


def oblique(angle: float, spacing, origin) -> np.ndarray:
    """A 4x4 affine: axes permuted (array axis 0 -> world z) and rotated about world x."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def save_registration(folder, fixed: Image, moving: Image, field: torch.Tensor, world: np.ndarray | None):
    """Write the outputs of a registration with this field and affine (no optimisation)."""
    warped = pipeline.warp_image(moving, fixed, field, world)
    result = outputs.RegistrationResult(fixed, moving, warped, field, {}, world, {"engine": "synthetic"})
    result.save(folder, figure=False)
    return folder


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, row)) for row in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3D registration folder: oblique grids, a rotation + shift and a smooth field up to 3 voxels."""
    root = tmp_path_factory.mktemp("points")
    fixed = Image(smooth_volume((36, 40, 32), seed=1) * 100, oblique(0.2, (1.2, 1.0, 1.1), (-20.0, -25.0, 10.0)))
    moving = Image(smooth_volume((34, 38, 30), seed=2) * 100, oblique(-0.1, (1.0, 1.1, 1.0), (-18.0, -22.0, 12.0)))
    io.save_image(fixed, root / "fixed.nii.gz")
    io.save_image(moving, root / "moving.nii.gz")
    angle = np.deg2rad(6.0)
    world = np.eye(4)
    world[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    world[:3, 3] = [3.0, -2.0, 1.5]
    field = smooth_random_field(fixed.shape, max_displacement=3.0, smoothness=12.0, seed=3)
    folder = save_registration(root / "reg", fixed, moving, field, world)
    io.write_itk_affine(root / "affine.mat", world)  # antspyx inverts only files named *.mat
    rng = np.random.default_rng(0)
    voxels = rng.uniform(2, np.asarray(fixed.shape) - 3, (12, 3))
    inside = apply_matrix(fixed.affine, voxels)
    outside = apply_matrix(fixed.affine, np.array([[-4.0, 10.0, 10.0], [10.0, 45.0, 5.0]]))  # beyond the grid
    return {"root": root, "folder": folder, "fixed": fixed, "world": world, "points": np.vstack([inside, outside])}


def points_frame(ras: np.ndarray):
    import pandas as pd

    lps = pts.lps_ras(ras)
    return pd.DataFrame({"x": lps[:, 0], "y": lps[:, 1], "z": lps[:, 2], "t": 0.0, "label": range(len(ras))})


def test_worked_example_from_the_docs(tmp_path):
    # a fixed point p = (10, 20, 30) RAS; the field moves it +2 mm along x (RAS), the affine
    # +5 mm along y: it is at (12, 25, 30) RAS in the moving scan, (-12, -25, 30) in LPS
    fixed = Image(np.ones((40, 40, 40), np.float32), np.eye(4))
    field = torch.zeros(1, 3, 40, 40, 40)
    field[:, 0] = 2.0  # voxels of 1 mm along array axis 0 = RAS x
    world = np.eye(4)
    world[1, 3] = 5.0
    folder = save_registration(tmp_path / "reg", fixed, fixed, field, world)
    points = write_csv(tmp_path / "p.csv", ["x", "y", "z", "t", "name"], [[-10, -20, 30, 0, "landmark"]])
    result = runner.invoke(app, ["transform-points", str(folder), str(points), "-o", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    assert "mapped 1 points (fixed -> moving, LPS mm)" in " ".join(result.output.split())
    (row,) = read_csv(tmp_path / "m.csv")
    assert [float(row[k]) for k in "xyz"] == pytest.approx([-12.0, -25.0, 30.0], abs=1e-6)
    assert row["t"] == "0" and row["name"] == "landmark"  # other columns as they were
    # --ras reads and writes RAS; --inverse goes back
    ras = write_csv(tmp_path / "r.csv", ["x", "y", "z"], [[12, 25, 30]])
    args = ["transform-points", str(folder), str(ras), "-o", str(tmp_path / "back.csv"), "--ras", "--inverse"]
    assert runner.invoke(app, args).exit_code == 0
    (row,) = read_csv(tmp_path / "back.csv")
    assert [float(row[k]) for k in "xyz"] == pytest.approx([10.0, 20.0, 30.0], abs=1e-4)


def test_points_agree_with_ants_both_ways(saved, tmp_path):
    ants = pytest.importorskip("ants")
    folder, root = saved["folder"], saved["root"]
    frame = points_frame(saved["points"])
    csv_path = tmp_path / "points.csv"
    frame.to_csv(csv_path, index=False)
    for inverse in (False, True):
        out = tmp_path / f"mapped_{inverse}.csv"
        args = ["transform-points", str(folder), str(csv_path), "-o", str(out)] + (["--inverse"] if inverse else [])
        assert runner.invoke(app, args).exit_code == 0
        by_voxreg = np.array([[float(r[k]) for k in "xyz"] for r in read_csv(out)])
        if inverse:  # -t [affine,1] -t field_itk_inverse: the inverse affine acts on the points first
            names, invert = [str(root / "affine.mat"), str(folder / "field_itk_inverse.nii.gz")], [True, False]
        else:  # -t field_itk -t affine: the field acts first, then the affine, A(p + u(p))
            names, invert = [str(folder / "field_itk.nii.gz"), str(folder / "affine.txt")], [False, False]
        by_ants = ants.apply_transforms_to_points(3, frame, names, whichtoinvert=invert)[list("xyz")].to_numpy()
        assert np.abs(by_voxreg - by_ants).max() < 0.05
        assert [r["label"] for r in read_csv(out)] == [str(i) for i in range(len(frame))]
    # the other order (affine first, then the field at the moved point) is a different map
    other = ants.apply_transforms_to_points(3, frame, [str(folder / "affine.txt"), str(folder / "field_itk.nii.gz")])
    forward = pts.lps_ras(pts.SavedRegistration.load(folder).map(saved["points"]))
    assert np.abs(other[list("xyz")].to_numpy() - forward).max() > 0.3


def test_forward_then_inverse_returns_the_points(saved):
    registration = pts.SavedRegistration.load(saved["folder"])
    inside = saved["points"][:-2]
    back = registration.map(registration.map(inside), inverse=True)
    assert np.abs(back - inside).max() < 0.05
    moved = registration.map(inside)
    assert np.linalg.norm(moved - inside, axis=1).min() > 1.0  # the transform is not trivial


def test_images_follow_the_same_rule_in_ants(saved):
    # ANTs warps the moving image with the same list that maps fixed points: -t field_itk -t affine
    ants = pytest.importorskip("ants")
    folder, root = saved["folder"], saved["root"]
    fixed_ants, moving_ants = ants.image_read(str(root / "fixed.nii.gz")), ants.image_read(str(root / "moving.nii.gz"))
    warped = io.load_image(folder / "warped.nii.gz").array
    interior = (slice(4, -4),) * 3

    def difference(names):
        out = ants.apply_transforms(fixed=fixed_ants, moving=moving_ants, transformlist=names).numpy()
        return float(np.abs(out - warped)[interior].mean())

    assert difference([str(folder / "field_itk.nii.gz"), str(folder / "affine.txt")]) < 0.01
    assert difference([str(folder / "affine.txt"), str(folder / "field_itk.nii.gz")]) > 0.2


def test_two_d_points(tmp_path):
    ants = pytest.importorskip("ants")
    affine = np.diag([1.5, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-30.0, -20.0, 2.0]  # a plane at z = 2 mm
    fixed = Image(smooth_volume((40, 36), seed=4), affine)
    field = smooth_random_field(fixed.shape, max_displacement=2.0, smoothness=10.0, seed=6)
    world = np.eye(4)
    world[:2, 3] = [1.0, -2.0]
    folder = save_registration(tmp_path / "reg", fixed, fixed, field, world)
    points = write_csv(tmp_path / "p.csv", ["x", "y", "comment"], [[5.0, 3.0, "a"], [-2.5, -1.0, "b"]])
    assert (
        runner.invoke(app, ["transform-points", str(folder), str(points), "-o", str(tmp_path / "m.csv")]).exit_code == 0
    )
    rows = read_csv(tmp_path / "m.csv")
    by_voxreg = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    import pandas as pd

    frame = pd.DataFrame({"x": [5.0, -2.5], "y": [3.0, -1.0]})
    names = [str(folder / "field_itk.nii.gz"), str(folder / "affine.txt")]
    by_ants = ants.apply_transforms_to_points(2, frame, names)[["x", "y"]].to_numpy()
    assert np.abs(by_voxreg - by_ants).max() < 0.05 and [r["comment"] for r in rows] == ["a", "b"]


def test_evaluate_uses_the_same_mapping(saved):
    registration = pts.SavedRegistration.load(saved["folder"])
    by_evaluate = methods.map_points(saved["points"], registration.fixed_affine, registration.field, saved["world"])
    np.testing.assert_array_equal(by_evaluate, registration.map(saved["points"]))


def test_an_older_run_without_the_inverse_field_still_maps_back(saved, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(saved["folder"], folder)
    (folder / "field_inverse.nii.gz").unlink()
    inside = saved["points"][:-2]
    registration = pts.SavedRegistration.load(folder)
    assert np.abs(registration.map(registration.map(inside), inverse=True) - inside).max() < 0.05
