"""CLI: real registrations through `voxreg register/warp`, and every bad-input case
gives one clear line, exit code 2, no traceback and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import smooth_volume, write_nifti
from voxreg.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_register_writes_all_outputs_and_improves(pair_3d, tmp_path):
    out = tmp_path / "out"
    result = run(
        "register",
        pair_3d["fixed"],
        pair_3d["moving"],
        "-o",
        out,
        "--no-affine",
        "--moving-labels",
        pair_3d["moving_labels"],
        "--fixed-labels",
        pair_3d["fixed_labels"],
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "warped.nii.gz",
            "warped_moving_labels.nii.gz",
            "field.nii.gz",
            "field_itk.nii.gz",
            "field_inverse.nii.gz",
            "field_itk_inverse.nii.gz",
            "metrics.json",
            "figure.png",
        ]
    )
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert values["dice_mean_after"] > values["dice_mean_before"] + 0.1
    assert values["similarity"]["ncc_after"] > values["similarity"]["ncc_before"]
    assert values["folding_percent"] < 0.5
    # the recovered field is close to the true 2-voxel shift along axis 0 in the interior
    field = nib.load(out / "field.nii.gz").get_fdata()
    assert abs(np.median(field[6:-6, 6:-6, 6:-6, 0]) - 2.0) < 0.5
    warped_labels = nib.load(out / "warped_moving_labels.nii.gz")
    assert np.issubdtype(warped_labels.get_data_dtype(), np.integer)


def test_default_runs_affine_then_deformable(pair_3d, tmp_path):
    out = tmp_path / "out"
    result = run(
        "register",
        pair_3d["fixed"],
        pair_3d["moving"],
        "-o",
        out,
        "--no-figure",
        "--moving-labels",
        pair_3d["moving_labels"],
        "--fixed-labels",
        pair_3d["fixed_labels"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "affine.txt").read_text(encoding="utf-8").startswith("#Insight Transform File V1.0")
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert values["dice_mean_affine"] > values["dice_mean_before"] + 0.1
    assert values["dice_mean_after"] >= values["dice_mean_affine"] - 0.02
    # the moving scan is the fixed one rolled by 2 voxels along axis 0 (1 mm voxels, RAS)
    matrix = np.array(
        [
            [float(v) for v in line.split()[1:]]
            for line in (out / "affine.txt").read_text(encoding="utf-8").splitlines()
            if line.startswith("Parameters:")
        ][0]
    )
    assert abs(abs(matrix[9]) - 2.0) < 0.5  # translation along x in LPS (sign flips from RAS)


def test_affine_only_stops_after_affine(pair_3d, tmp_path):
    out = tmp_path / "out"
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", out, "--affine-only", "--no-figure")
    assert result.exit_code == 0, result.output
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert values["engine"] == "affine" and values["folding_percent"] == 0.0
    assert (out / "affine.txt").exists()


def test_warp_applies_saved_composite_like_register(pair_3d, tmp_path):
    out = tmp_path / "out"
    assert (
        run("register", pair_3d["fixed"], pair_3d["moving"], "-o", out, "--no-figure", "--device", "cpu").exit_code == 0
    )
    assert (out / "affine.txt").exists()
    warped_path = tmp_path / "again.nii.gz"
    result = run("warp", out / "field.nii.gz", pair_3d["moving"], "-o", warped_path)
    assert result.exit_code == 0, result.output
    again = nib.load(warped_path).get_fdata()
    original = nib.load(out / "warped.nii.gz").get_fdata()
    assert np.abs(again - original).max() < 1e-5
    labels_path = tmp_path / "labels.nii.gz"
    assert run("warp", out / "field.nii.gz", pair_3d["moving_labels"], "-o", labels_path, "--nearest").exit_code == 0
    assert set(np.unique(nib.load(labels_path).get_fdata())) <= {0.0, 1.0, 2.0}


# ----------------------------------------------------------------------------- bad input


def test_missing_file(pair_3d, tmp_path):
    result = run("register", pair_3d["fixed"], tmp_path / "nope.nii.gz", "-o", tmp_path / "out")
    assert_user_error(result, "nope.nii.gz")
    assert not any((tmp_path / "out").glob("*"))


def test_wrong_format(pair_3d, tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image")
    assert_user_error(run("register", pair_3d["fixed"], bad, "-o", tmp_path / "out"), "notes.nii.gz")


def test_2d_vs_3d_mismatch(pair_3d, tmp_path):
    flat = write_nifti(tmp_path / "slice.nii.gz", smooth_volume((24, 28)))
    assert_user_error(run("register", pair_3d["fixed"], flat, "-o", tmp_path / "out"), "slice.nii.gz", "2D")


def test_4d_volume(pair_3d, tmp_path):
    series = write_nifti(tmp_path / "fmri.nii.gz", np.stack([smooth_volume((24, 28, 20))] * 3, axis=-1))
    assert_user_error(run("register", pair_3d["fixed"], series, "-o", tmp_path / "out"), "fmri.nii.gz", "4D")


def test_nan_voxels(pair_3d, tmp_path):
    data = smooth_volume((24, 28, 20))
    data[3, 3, 3] = np.nan
    bad = write_nifti(tmp_path / "nan.nii.gz", data)
    assert_user_error(run("register", pair_3d["fixed"], bad, "-o", tmp_path / "out"), "nan.nii.gz", "NaN")


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_empty_or_constant_image(pair_3d, tmp_path, value):
    bad = write_nifti(tmp_path / "flat.nii.gz", np.full((24, 28, 20), value, np.float32))
    assert_user_error(run("register", pair_3d["fixed"], bad, "-o", tmp_path / "out"), "flat.nii.gz")


def test_label_map_with_non_integer_values(pair_3d, tmp_path):
    bad = write_nifti(tmp_path / "soft_labels.nii.gz", smooth_volume((24, 28, 20)))
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--moving-labels", bad)
    assert_user_error(result, "soft_labels.nii.gz", "integer")


def test_corrupted_checkpoint(pair_3d, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--model", bad)
    assert_user_error(result, "model.pt")
    assert not any((tmp_path / "out").glob("*"))


def test_checkpoint_from_another_model(pair_3d, tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--model", other)
    assert_user_error(result, "resnet.pt")


def test_output_dir_not_writable(pair_3d, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", blocker / "out")
    assert_user_error(result, "a_file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_absent(pair_3d, tmp_path):
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--device", "cuda")
    assert_user_error(result, "CUDA")
    assert not any((tmp_path / "out").glob("*"))


def test_unknown_similarity(pair_3d, tmp_path):
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--similarity", "cosine")
    assert_user_error(result, "cosine")


def test_warp_with_a_file_that_is_not_a_field(pair_3d, tmp_path):
    assert_user_error(run("warp", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "w.nii.gz"), "fixed.nii.gz")


def tiny_checkpoint(path: Path, ndim: int = 3) -> Path:
    from voxreg.nn import NetworkConfig, VoxelMorph, save_checkpoint

    torch.manual_seed(0)
    model = VoxelMorph(NetworkConfig(ndim=ndim, enc_features=(4, 4), dec_features=(4, 4, 4, 4), half_res=True))
    return save_checkpoint(path, model)


def test_register_with_a_network_and_refinement(pair_3d, tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "net"
    result = run(
        "register",
        pair_3d["fixed"],
        pair_3d["moving"],
        "-o",
        out,
        "--no-affine",
        "--no-figure",
        "--model",
        model,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert values["engine"] == "network"
    refined = tmp_path / "refined"
    result = run(
        "register",
        pair_3d["fixed"],
        pair_3d["moving"],
        "-o",
        refined,
        "--no-affine",
        "--no-figure",
        "--model",
        model,
        "--refine",
        "30",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    refined_values = json.loads((refined / "metrics.json").read_text(encoding="utf-8"))
    assert refined_values["engine"] == "network+refine30"
    # an untrained network leaves the pair misaligned; refinement aligns it
    assert refined_values["similarity"]["mse_after"] < 0.5 * values["similarity"]["mse_after"]


def test_model_of_the_wrong_dimensionality(pair_3d, tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny2d.pt", ndim=2)
    result = run("register", pair_3d["fixed"], pair_3d["moving"], "-o", tmp_path / "out", "--model", model)
    assert_user_error(result, "tiny2d.pt", "2D")


def test_preprocess_command(tmp_path):
    atlas = smooth_volume((30, 34, 28), seed=11)
    scans = []
    for index, shift in enumerate([(3.0, 0.0, 0.0), (0.0, -2.0, 2.0)]):
        affine = np.eye(4)
        affine[:3, 3] = shift  # same anatomy, stored at another position
        scans.append(write_nifti(tmp_path / f"scan{index}.nii.gz", atlas, affine))
    atlas_path = write_nifti(tmp_path / "atlas.nii.gz", atlas)
    out = tmp_path / "pre"
    result = run("preprocess", *scans, "-o", out, "--atlas", atlas_path, "--multiple", "8")
    assert result.exit_code == 0, result.output
    rows = (out / "manifest.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(rows) == 3 and all(",ok," in row for row in rows[1:])
    aligned = nib.load(out / "scan0.nii.gz")
    assert all(s % 8 == 0 for s in aligned.shape)
    assert (out / "summary.png").stat().st_size > 0


def test_preprocess_labels_count_mismatch(tmp_path):
    scan = write_nifti(tmp_path / "scan.nii.gz", smooth_volume((20, 20, 20)))
    result = run("preprocess", scan, scan, "-o", tmp_path / "pre", "--labels", scan)
    assert_user_error(result, "--labels")


def test_train_then_register_with_the_trained_model(tmp_path):
    base = smooth_volume((16, 16, 16), seed=21)
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(4):
        write_nifti(folder / f"s{index}.nii.gz", np.roll(base, index - 2, axis=index % 3))
    run_dir = tmp_path / "run"
    result = run(
        "train",
        folder,
        "-o",
        run_dir,
        "--network",
        "vm1",
        "--steps",
        "6",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "3",
        "--validate-every",
        "3",
        "--val",
        folder / "s0.nii.gz",
        "--val",
        folder / "s1.nii.gz",
        "--lambda-range",
        "0.1",
        "10",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    rows = (run_dir / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(rows) == 7  # header + 6 steps
    out = tmp_path / "reg"
    result = run(
        "register",
        folder / "s0.nii.gz",
        folder / "s3.nii.gz",
        "-o",
        out,
        "--no-affine",
        "--no-figure",
        "--model",
        run_dir / "last.pt",
        "--lambda",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["engine"] == "network"


def test_train_with_no_scans(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run("train", empty, "-o", tmp_path / "run"), "no scans")
