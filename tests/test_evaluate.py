"""voxreg evaluate: pairs CSV checks, Dice/HD95/SD log J/TRE/peak memory against known answers,
HD95 cross-checked with MONAI, end-to-end runs through the CLI (affine, instance, ANTs SyN),
resume, failures recorded per row, atomic CSVs."""

from __future__ import annotations

import csv
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from conftest import SHARED_DATA, smooth_volume, write_nifti
from voxreg import io, metrics
from voxreg.cli import app
from voxreg.core.errors import VoxregError
from voxreg.evaluation import ants as ev_ants
from voxreg.evaluation import measure, methods
from voxreg.evaluation import pairs as ev_pairs
from voxreg.evaluation import runner as ev
from voxreg.evaluation import store as ev_store
from voxreg.evaluation.types import EvaluationOptions, MethodOutput

runner = CliRunner()
SHIFT = 3  # voxels along array axis 0 between fixed and moving
SPACING = (2.0, 1.0, 1.5)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_points(path: Path, points: np.ndarray) -> Path:
    lines = ["x,y,z"] + [",".join(f"{v:.6f}" for v in row) for row in points]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_pair(
    folder: Path, shape=(24, 24, 24), shift=SHIFT, spacing=SPACING, name="a", landmarks=True
) -> dict[str, Path]:
    """A smooth blob volume and the same rolled by ``shift`` voxels along axis 0 (so a point at
    fixed voxel x is at x + shift in the moving scan), label maps 17/53 (+ 1, not in aseg30),
    and landmarks in world RAS mm."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing[: len(shape)], *([1.0] * (3 - len(shape))), 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    fixed = smooth_volume(shape, seed=1)
    labels = np.zeros(shape, np.int16)
    labels[fixed > 0.3] = 17
    labels[fixed > 0.6] = 53
    labels[(fixed > 0.15) & (labels == 0)] = 1
    paths = {
        "fixed": write_nifti(folder / f"{name}_fixed.nii.gz", fixed, affine),
        "moving": write_nifti(folder / f"{name}_moving.nii.gz", np.roll(fixed, shift, axis=0), affine),
        "fixed_labels": write_nifti(folder / f"{name}_fixed_labels.nii.gz", labels, affine),
        "moving_labels": write_nifti(folder / f"{name}_moving_labels.nii.gz", np.roll(labels, shift, axis=0), affine),
    }
    if landmarks:
        voxels = np.array([[10, 12, 12], [8, 9, 15], [14, 15, 9], [12, 10, 11]], float)[:, : len(shape)]
        voxels = np.pad(voxels, ((0, 0), (0, 3 - len(shape))))
        moved = voxels + [shift, 0, 0]
        paths["fixed_landmarks"] = write_points(
            folder / f"{name}_fixed_points.csv", voxels @ affine[:3, :3].T + affine[:3, 3]
        )
        paths["moving_landmarks"] = write_points(
            folder / f"{name}_moving_points.csv", moved @ affine[:3, :3].T + affine[:3, 3]
        )
    return paths


def write_pairs_csv(path: Path, pairs: list[dict[str, Path]], relative: bool = True) -> Path:
    columns = [c for c in ev_pairs.PAIR_COLUMNS[1:] if c in pairs[0]]
    lines = [",".join(columns)]
    for pair in pairs:
        values = [pair[c].relative_to(path.parent) if relative else pair[c] for c in columns]
        lines.append(",".join(str(v) for v in values))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pairs_csv(tmp_path: Path) -> Path:
    return write_pairs_csv(tmp_path / "pairs.csv", [make_pair(tmp_path / "data")])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- pairs CSV


def test_read_pairs_resolves_relative_paths_and_default_id(pairs_csv):
    (pair,) = ev_pairs.read_pairs(pairs_csv)
    assert pair.id == "a_moving_to_a_fixed"
    assert pair.fixed == pairs_csv.parent / "data" / "a_fixed.nii.gz" and pair.fixed.exists()
    assert pair.moving_landmarks.name == "a_moving_points.csv"
    points = ev_pairs.read_landmarks(pair.fixed_landmarks)
    assert points.shape == (4, 3) and points[0].tolist() == pytest.approx([10.0, 17.0, 20.0])


@pytest.mark.parametrize(
    "header, row, message",
    [
        ("moving", "data/a_moving.nii.gz", "fixed,moving (missing fixed"),
        ("fixed,moving,colour", "data/a_fixed.nii.gz,data/a_moving.nii.gz,red", "unknown column(s) colour"),
        ("fixed,moving", "data/a_fixed.nii.gz,data/nope.nii.gz", "line 2: moving file not found"),
        ("fixed,moving", "data/a_fixed.nii.gz,", "line 2: empty 'moving' path"),
        (
            "fixed,moving,fixed_labels",
            "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_labels.nii.gz",
            "fixed_labels and moving_labels must be given together",
        ),
        (
            "fixed,moving,fixed_landmarks,moving_landmarks",
            "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_points.csv,data/short.csv",
            "has 4 landmarks but",
        ),
        (
            "fixed,moving,fixed_landmarks,moving_landmarks",
            "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_points.csv,data/bad.csv",
            "needs a header with x,y,z",
        ),
        (
            "id,fixed,moving",
            "p,data/a_fixed.nii.gz,data/a_moving.nii.gz\np,data/a_fixed.nii.gz,data/a_moving.nii.gz",
            "line 3: id 'p' already used on line 2",
        ),
        ("fixed,moving", "", "no pairs"),
    ],
)
def test_bad_pairs_csv_is_one_clear_error(tmp_path, header, row, message):
    make_pair(tmp_path / "data")
    write_points(tmp_path / "data" / "short.csv", np.zeros((2, 3)))
    (tmp_path / "data" / "bad.csv").write_text("a,b,c\n1,2,3\n")
    path = tmp_path / "pairs.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(VoxregError, match=None) as info:
        ev_pairs.read_pairs(path)
    assert str(path) in str(info.value) or "data" in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    result = runner.invoke(app, ["evaluate", str(path), "-o", str(tmp_path / "out"), "--methods", "affine"])
    assert_one_line_error(result, message)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_bad_options_fail_before_any_work(pairs_csv, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(
        runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "affine,magic"]),
        "unknown method(s) magic",
    )
    assert_one_line_error(
        runner.invoke(
            app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "affine", "--structures", "aseg99"]
        ),
        "unknown label preset 'aseg99'",
    )
    assert_one_line_error(
        runner.invoke(
            app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "instance", "--exclude-labels", "0,x"]
        ),
        "--exclude-labels must be a comma list",
    )
    assert not (out / "results.csv").exists()


def test_network_method_without_model_uses_the_shipped_default(pairs_csv, tmp_path):
    """`evaluate --methods network` without --model runs the shipped default model, as
    `voxreg register` does (it used to refuse)."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "network"])
    assert result.exit_code == 0, result.output
    [row] = list(csv.DictReader((out / "results.csv").open()))
    assert (row["method"], row["status"]) == ("network", "ok"), row
    assert "brain" in row["settings"], row["settings"]


# --------------------------------------------------------------------------- HD95


def cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def reference_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """MONAI's definition written out (surfaces by face-connected erosion, scipy EDT): an
    independent code path used where MONAI itself is not needed (per-structure cropping)."""

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    def directed(x, y):
        return np.percentile(ndimage.distance_transform_edt(~surface(y), sampling=spacing)[surface(x)], 95)

    return float(max(directed(a, b), directed(b, a)))


def monai_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 from ``monai.metrics.compute_hausdorff_distance(percentile=95)`` (the reference tool)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, ref = (torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None] for m in (b, a))
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        return float(
            compute_hausdorff_distance(
                pred, ref, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
            )[0, 0]
        )


def test_dice_of_hand_made_overlaps_equals_the_fraction():
    a, b = cube((20, 20, 20), (2, 2, 2), 10), cube((20, 20, 20), (5, 2, 2), 10)  # 7 of 10 slices shared
    labels_a, labels_b = a.astype(np.int16) * 17, b.astype(np.int16) * 17
    assert metrics.dice_per_label(labels_a, labels_b, [17])[17] == pytest.approx(0.7)
    half = labels_a.copy()
    half[7:] = 0  # 5 of its 10 slices left: 2 * 500 / (1000 + 500)
    assert metrics.dice_per_label(labels_a, half, [17])[17] == pytest.approx(2 / 3)


def test_hd95_hand_cases():
    shape = (30, 20, 20)
    a, b = cube(shape, (5, 5, 5), 10), cube(shape, (8, 5, 5), 10)
    assert metrics.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # 3 voxels of 2 mm along axis 0
    assert metrics.hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert metrics.hd95(a, a, (2.0, 1.0, 1.0)) == 0.0
    assert np.isnan(metrics.hd95(a, np.zeros(shape, bool), (1.0, 1.0, 1.0)))
    single_a, single_b = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    single_a[2, 2], single_b[5, 6] = True, True  # 2D, offset (3, 4) voxels
    assert metrics.hd95(single_a, single_b, (1.0, 1.0)) == pytest.approx(5.0)
    # cubes touching the image border have a surface there: faces x=0 and x=2 are 2 voxels apart
    assert metrics.hd95(cube(shape, (0, 0, 0), 6), cube(shape, (2, 0, 0), 6), (1.0, 1.0, 1.0)) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "k, spacing", [(1, (1.0, 1.0, 1.0)), (4, (1.0, 1.0, 1.0)), (3, (1.5, 1.0, 1.0)), (2, (0.7, 2.0, 1.2))]
)
def test_hd95_of_boxes_offset_by_k_voxels_is_k_times_spacing(k, spacing):
    shape = (30, 22, 22)
    a, b = cube(shape, (6, 5, 5), 12), cube(shape, (6 + k, 5, 5), 12)
    assert metrics.hd95(a, b, spacing) == pytest.approx(k * spacing[0])
    c = cube(shape, (6, 5 + k, 5), 12)  # the same offset along axis 1 is measured in axis-1 mm
    assert metrics.hd95(a, c, spacing) == pytest.approx(k * spacing[1])


def test_hd95_matches_monai_on_irregular_shapes():
    pytest.importorskip("monai", reason="MONAI not installed (pip install 'voxreg[test]')")
    volume = smooth_volume((28, 24, 20), seed=3)
    a, b = volume > 0.35, np.roll(volume, (2, -1, 1), axis=(0, 1, 2)) > 0.45
    spacing = (1.2, 0.8, 2.5)
    expected = monai_hd95(a, b, spacing)
    assert expected > 1.0  # a real difference, not two identical masks
    assert metrics.hd95(a, b, spacing) == pytest.approx(expected, abs=1e-4)


MINDBOGGLE = SHARED_DATA / "brain_mri" / "mindboggle_oasis_trt20"


@pytest.mark.skipif(
    not (MINDBOGGLE / "OASIS-TRT-20-1" / "labels_DKT31_CMA.nii.gz").exists(),
    reason=f"Mindboggle label maps not available under {MINDBOGGLE}",
)
def test_hd95_matches_monai_on_mindboggle_label_maps():
    """Manual DKT31 labels of two subjects put on one grid (centre crop): per-structure HD95
    from voxreg (cropped boxes, SimpleITK) equals MONAI's on the full masks."""
    pytest.importorskip("monai", reason="MONAI not installed (pip install 'voxreg[test]')")
    maps = [
        io.load_image(MINDBOGGLE / f"OASIS-TRT-20-{n}" / "labels_DKT31_CMA.nii.gz", label=True).array for n in (1, 2)
    ]
    shape = tuple(min(a.shape[i] for a in maps) for i in range(3))
    fixed, moving = (a[tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(a.shape, shape))] for a in maps)
    spacing = (1.0, 1.2, 0.9)  # anisotropic on purpose: spacing must be applied per axis
    labels = [17, 53, 1028, 2028, 1035]  # hippocampi, superior frontal and insula cortices
    scores = metrics.structure_scores(fixed, moving, labels, spacing)
    for label in labels:
        expected = monai_hd95(fixed == label, moving == label, spacing)
        assert expected > 1.0
        assert scores[label][1] == pytest.approx(expected, rel=1e-4, abs=1e-4), label


def test_structure_scores_crop_each_label_like_whole_volume_hd95():
    labels = np.zeros((30, 26, 22), np.int32)
    labels[4:14, 5:15, 5:15], labels[16:26, 8:20, 3:12], labels[:2] = 17, 1002, -4
    warped = np.roll(labels, (2, 1, 0), axis=(0, 1, 2))
    warped[warped == 17] = 0  # 17 lost by the warp: Dice 0, HD95 undefined
    spacing = (1.5, 1.0, 0.8)
    scores = metrics.structure_scores(labels, warped, [0, 17, 1002, -4, 99], spacing)
    for label in (0, 1002, -4):
        assert scores[label][1] == pytest.approx(reference_hd95(labels == label, warped == label, spacing), abs=1e-4)
    assert scores[1002][0] == pytest.approx(2 * 8 * 11 * 9 / (2 * 10 * 12 * 9))  # shifted by 2 and 1 voxels
    assert scores[17][0] == 0.0 and np.isnan(scores[17][1])
    assert np.isnan(scores[99][0]) and np.isnan(scores[99][1])


# --------------------------------------------------------------------------- points and fields


def test_map_points_applies_field_then_world_matrix():
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    field = np.zeros((3, 8, 8, 8), np.float32)
    field[0] = 1.5  # +1.5 voxels (3 mm) along axis 0 everywhere
    world = np.eye(4)
    world[:3, 3] = [0.0, 10.0, 0.0]
    mapped = methods.map_points(np.array([[4.0, 3.0, 2.0]]), affine, field, world)
    assert mapped[0].tolist() == pytest.approx([7.0, 13.0, 2.0])


def test_affine_tre_has_the_right_sign(tmp_path, pairs_csv):
    """moving = fixed shifted by +3 voxels (6 mm): TRE 6 mm before; a wrong direction of the
    landmark mapping would give 12 mm after, the right one ~0."""
    result = ev.evaluate(pairs_csv, tmp_path / "out", ["affine"], device="cpu", examples=0)
    (row,) = result.rows
    assert row["status"] == "ok", row["error"]
    assert float(row["tre_before_mm"]) == pytest.approx(SHIFT * SPACING[0])
    assert float(row["tre_after_mm"]) < 0.3
    assert float(row["folding_percent"]) == 0.0 and float(row["sdlogj"]) == 0.0
    assert float(row["dice_mean"]) > 0.95 > float(row["dice_before"])
    assert float(row["hd95_mean_mm"]) < 1.0
    assert float(row["ncc_after"]) > 0.99 > float(row["ncc_before"])
    assert float(row["mi_after"]) > float(row["mi_before"])


# --------------------------------------------------------------------------- end to end


def test_cli_affine_and_instance_end_to_end(tmp_path, pairs_csv):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(pairs_csv),
            "-o",
            str(out),
            "--methods",
            "affine,instance",
            "--iterations",
            "6,4,2",
            "--device",
            "cpu",
            "--examples",
            "1",
            "--structures",
            "aseg30",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(ev.RESULT_COLUMNS)
    assert [(r["id"], r["method"], r["status"]) for r in rows] == [
        ("a_moving_to_a_fixed", "affine", "ok"),
        ("a_moving_to_a_fixed", "instance", "ok"),
    ]
    for row in rows:
        assert float(row["dice_mean"]) >= float(row["dice_before"]) + 0.2
        assert float(row["ncc_after"]) > float(row["ncc_before"])
        assert float(row["tre_after_mm"]) < 1.5 < float(row["tre_before_mm"])
        assert float(row["folding_percent"]) < 1.0
        # a 24^3 pair: a measured (finite, written) peak well under a GB; NaN/empty or a unit error fails
        assert float(row["seconds"]) > 0 and 0.0 <= float(row["peak_memory_mb"]) < 1000.0
        assert row["device"] == "cpu" and int(row["threads"]) >= 1
    affine_row, instance_row = rows
    assert float(affine_row["sdlogj"]) == 0.0  # no deformable field: log J is exactly 0 everywhere
    assert float(instance_row["sdlogj"]) > 1e-4  # instance optimisation moved voxels
    instance = json.loads(rows[1]["settings"])
    assert instance["engine"] == "instance-optimisation"
    assert instance["align_config"]["iterations"] == [6, 4, 2] and instance["align_config"]["scales"] == [4, 2, 1]
    structures = read_csv(out / "per_structure.csv")
    # label 1 is present in both maps but not in aseg30; 17 and 53 are
    assert sorted((r["method"], r["label"], r["name"]) for r in structures) == [
        ("affine", "17", "Left-Hippocampus"),
        ("affine", "53", "Right-Hippocampus"),
        ("instance", "17", "Left-Hippocampus"),
        ("instance", "53", "Right-Hippocampus"),
    ]
    for row in rows:  # results.csv summarises exactly its per-structure rows
        own = [r for r in structures if r["method"] == row["method"]]
        assert float(row["dice_mean"]) == pytest.approx(np.mean([float(r["dice"]) for r in own]), abs=1e-5)
        assert float(row["hd95_mean_mm"]) == pytest.approx(np.mean([float(r["hd95_mm"]) for r in own]), abs=1e-4)
    for r in structures:  # the affine stage undoes the 3-voxel shift: near-perfect overlap, HD95 under a voxel
        if r["method"] == "affine":
            assert float(r["dice"]) > 0.95 and float(r["hd95_mm"]) <= max(SPACING)
    assert sorted(p.name for p in (out / "examples").iterdir()) == [
        "a_moving_to_a_fixed_affine.png",
        "a_moving_to_a_fixed_instance.png",
    ]
    assert "2 run, 0 already done, 0 failed" in result.output
    table = (out / "table.md").read_text(encoding="utf-8")  # the report is always written from the CSVs
    assert "| affine |" in table and "| instance |" in table
    assert {"table.md", "summary.csv", "dice_boxplot.png", "report.html"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_2d_pair_and_exclude_labels(tmp_path):
    pair = make_pair(tmp_path / "data", shape=(32, 28), spacing=(1.5, 1.0))
    path = write_pairs_csv(tmp_path / "pairs.csv", [pair])
    result = ev.evaluate(path, tmp_path / "out", "affine", device="cpu", exclude_labels=(0, 53), examples=1)
    (row,) = result.rows
    assert row["status"] == "ok", row["error"]
    assert float(row["dice_mean"]) > float(row["dice_before"]) + 0.2
    assert float(row["tre_before_mm"]) == pytest.approx(SHIFT * 1.5) and float(row["tre_after_mm"]) < 0.3
    assert sorted(r["label"] for r in result.structure_rows) == [1, 17]
    assert result.examples[0].exists()


def test_network_methods_with_a_tiny_checkpoint(tmp_path, pairs_csv):
    import torch

    from voxreg.nn import NetworkConfig, VoxelMorph, save_checkpoint

    torch.manual_seed(0)
    model = save_checkpoint(
        tmp_path / "tiny.pt",
        VoxelMorph(NetworkConfig(ndim=3, enc_features=(4, 4), dec_features=(4, 4, 4, 4), half_res=True)),
    )
    assert ev.resolve_methods(None, model) == ["affine", "ants-syn", "instance", "network", "network-refine"]
    assert ev.resolve_methods(None, None) == ["affine", "ants-syn", "instance"]
    result = ev.evaluate(
        pairs_csv, tmp_path / "out", "network,network-refine", model=model, refine=6, device="cpu", examples=0
    )
    network, refined = result.rows
    assert network["status"] == refined["status"] == "ok", (network["error"], refined["error"])
    assert json.loads(network["settings"])["engine"] == "network"
    assert json.loads(refined["settings"])["engine"] == "network+refine6"
    assert json.loads(refined["settings"])["model"] == str(model)
    for row in (network, refined):  # the affine stage already aligns this shifted pair
        assert row["dice_mean"] > row["dice_before"] + 0.2 and row["tre_after_mm"] < row["tre_before_mm"]
        assert 0.0 <= row["folding_percent"] < 5.0


def test_default_method_and_a_shipped_model_by_name(tmp_path, pairs_csv, monkeypatch):
    import torch

    from voxreg.nn import NetworkConfig, VoxelMorph, save_checkpoint
    from voxreg.nn import shipped as shipped_module
    from voxreg.nn.shipped import export_shipped

    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        tmp_path / "tiny.pt",
        VoxelMorph(NetworkConfig(ndim=3, enc_features=(4, 4), dec_features=(4, 4, 4, 4), half_res=True)),
    )
    card = {"name": "tiny", "description": "t", "anatomy": "any", "ndim": 3, "default": True, "refine": 4}
    export_shipped(checkpoint, tmp_path / "models", card)
    monkeypatch.setattr(shipped_module, "models_dir", lambda: tmp_path / "models")
    with pytest.raises(VoxregError, match="nope: model checkpoint not found|no shipped model named 'nope'"):
        ev.resolve_methods("network", "nope")
    result = ev.evaluate(
        pairs_csv, tmp_path / "out", "default,instance,network,network-refine", model="tiny", device="cpu", examples=0
    )
    engines = {row["method"]: json.loads(row["settings"])["engine"] for row in result.rows}
    assert all(row["status"] == "ok" for row in result.rows), [row["error"] for row in result.rows]
    # default = register() with no options: the shipped default and its card's refinement;
    # instance never uses the shipped model
    assert engines == {
        "default": "network+refine4",
        "instance": "instance-optimisation",
        "network": "network",
        "network-refine": "network+refine4",
    }
    reasons = {row["method"]: json.loads(row["settings"])["engine_reason"] for row in result.rows}
    assert reasons["default"] == "shipped model tiny" and reasons["instance"] == "--engine instance"


# --------------------------------------------------------------------------- resume and failures


def fake_method(calls: list[str], fail_first: bool = False):
    """An identity 'registration' that counts its calls (and raises on the first if asked)."""

    def run(data: ev_pairs.PairData, options: EvaluationOptions) -> MethodOutput:
        calls.append(data.pair.id)
        if fail_first and len(calls) == 1:
            raise RuntimeError("boom\non two lines")
        field = np.zeros((data.fixed.ndim, *data.fixed.shape), np.float32)
        warped = io.resample_to(data.moving, data.fixed)
        labels = io.resample_to(data.moving_labels, data.fixed, nearest=True)
        return MethodOutput(
            warped=warped,
            field=field,
            map_points=lambda p: p,
            seconds=0.01,
            warped_labels=labels,
            settings={"fake": True},
        )

    return run


def test_resume_skips_done_rows_and_retries_failed_ones(tmp_path, monkeypatch):
    pairs = [make_pair(tmp_path / "data", name=n, landmarks=False, shape=(12, 12, 12)) for n in ("a", "b")]
    path = write_pairs_csv(tmp_path / "pairs.csv", pairs)
    calls: list[str] = []
    monkeypatch.setitem(ev.METHODS, "fake", fake_method(calls, fail_first=True))
    first = ev.evaluate(path, tmp_path / "out", ["fake"], device="cpu", examples=0)
    assert [r["status"] for r in first.rows] == ["failed", "ok"]
    assert first.rows[0]["error"] == "RuntimeError: boom on two lines"
    assert calls == ["a_moving_to_a_fixed", "b_moving_to_b_fixed"]
    progress: list[tuple[int, int]] = []
    second = ev.evaluate(
        path,
        tmp_path / "out",
        ["fake"],
        device="cpu",
        examples=0,
        progress=lambda done, total, row: progress.append((done, total)),
    )
    assert calls == ["a_moving_to_a_fixed", "b_moving_to_b_fixed", "a_moving_to_a_fixed"]  # only the failed one
    assert (second.ran, second.skipped, second.failed) == (1, 1, 0)
    assert progress[-1] == (2, 2)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert sorted((r["id"], r["status"]) for r in rows) == [
        ("a_moving_to_a_fixed", "ok"),
        ("b_moving_to_b_fixed", "ok"),
    ]
    assert [type(r["dice_mean"]) for r in second.rows] == [float, float]  # read back and new rows alike
    assert float(rows[0]["dice_mean"]) == pytest.approx(float(rows[0]["dice_before"]))  # identity: no change
    third = ev.evaluate(path, tmp_path / "out", ["fake"], device="cpu", examples=0)
    assert len(calls) == 3 and third.skipped == 2
    assert len(read_csv(tmp_path / "out" / "per_structure.csv")) == 2 * 3  # labels 1, 17, 53 per pair


def test_a_crashing_method_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    pair = make_pair(tmp_path / "data", landmarks=False, shape=(12, 12, 12))
    path = write_pairs_csv(tmp_path / "pairs.csv", [pair])

    def crash(data, options):
        raise ValueError("the optimiser diverged")

    calls: list[str] = []
    monkeypatch.setitem(ev.METHODS, "instance", crash)
    monkeypatch.setitem(ev.METHODS, "affine", fake_method(calls))
    result = runner.invoke(
        app, ["evaluate", str(path), "-o", str(tmp_path / "out"), "--methods", "instance,affine", "--examples", "0"]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [(r["method"], r["status"], r["error"]) for r in rows] == [
        ("instance", "failed", "ValueError: the optimiser diverged"),
        ("affine", "ok", ""),
    ]
    assert rows[0]["dice_mean"] == "" and float(rows[1]["dice_mean"]) > 0.0
    assert "failed: a_moving_to_a_fixed instance: ValueError: the optimiser diverged" in result.output


def test_an_unreadable_pair_fails_its_rows_only(tmp_path, monkeypatch):
    good = make_pair(tmp_path / "data", name="a", landmarks=False, shape=(12, 12, 12))
    bad = make_pair(tmp_path / "data", name="b", landmarks=False, shape=(12, 12, 12))
    bad["moving"].write_bytes(b"not a nifti")
    calls: list[str] = []
    monkeypatch.setitem(ev.METHODS, "fake", fake_method(calls))
    result = ev.evaluate(
        write_pairs_csv(tmp_path / "pairs.csv", [bad, good]), tmp_path / "out", ["fake"], device="cpu", examples=0
    )
    assert [r["status"] for r in result.rows] == ["failed", "ok"]
    assert "b_moving.nii.gz" in result.rows[0]["error"] and calls == ["a_moving_to_a_fixed"]


def test_csv_rewrite_is_atomic(tmp_path, monkeypatch):
    pair = make_pair(tmp_path / "data", landmarks=False, shape=(12, 12, 12))
    path = write_pairs_csv(tmp_path / "pairs.csv", [pair])
    monkeypatch.setitem(ev.METHODS, "fake", fake_method([]))
    ev.evaluate(path, tmp_path / "out", ["fake"], device="cpu", examples=0)
    before = (tmp_path / "out" / "results.csv").read_bytes()

    def interrupted(value):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev_store, "_csv_value", interrupted)
    store = ev_store.ResultStore(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        store.add({"id": "x", "method": "fake", "status": "ok"}, [])
    assert (tmp_path / "out" / "results.csv").read_bytes() == before
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # temporary file removed


def test_peak_memory_sees_a_large_allocation():
    with measure.PeakMemory("cpu") as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block.sum()
        time.sleep(0.1)
        del block
    assert 50.0 < memory.peak_mb < 200.0


def test_peak_memory_of_a_known_200_mb_array():
    with measure.PeakMemory("cpu") as memory:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page touched
        time.sleep(0.1)
        del block
    assert 190.0 <= memory.peak_mb < 300.0
    with measure.PeakMemory("cpu") as idle:  # nothing allocated: (almost) nothing measured
        time.sleep(0.05)
    assert 0.0 <= idle.peak_mb < 20.0


def test_peak_memory_counts_reused_blocks_and_hands_nothing_back():
    """A method that reuses 200 MiB another one freed (kept by the allocator) still counts
    them, and entering the measure does not hand the kept memory back to the OS (the method
    then runs on pages the process holds, as in register-batch)."""
    from voxreg.core import runtime

    if not sys.platform.startswith("linux") or runtime.heap_in_use_mb() is None:
        pytest.skip("the heap count needs glibc's mallinfo2")
    if not runtime.configure_allocator():
        pytest.skip("glibc allocator settings not applied")
    earlier = np.ones(200 * 2**20 // 8)
    del earlier  # kept inside the process
    kept = measure._resident_mb()
    with measure.PeakMemory("cpu") as memory:
        assert measure._resident_mb() > kept - 50.0  # nothing handed back
        block = np.ones(200 * 2**20 // 8)
        time.sleep(0.1)
        del block
    assert 190.0 <= memory.peak_mb < 300.0


# --------------------------------------------------------------------------- Jacobian


def numpy_sdlogj(field: np.ndarray) -> float:
    """SD of log det(I + grad u) written with numpy (central differences, one-sided borders)."""
    ndim = field.shape[0]
    grads = np.stack([np.stack(np.gradient(field[c].astype(np.float64)), axis=0) for c in range(ndim)], axis=0)
    jac = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(ndim)
    return float(np.std(np.log(np.clip(np.linalg.det(jac), 1e-9, 1e9))))


def test_sdlogj_of_an_affine_field_is_zero_and_of_a_random_field_matches_numpy():
    shape = (12, 14, 10)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    linear = np.array([[0.1, 0.05, 0.0], [0.0, -0.08, 0.02], [0.03, 0.0, 0.12]])
    affine_field = np.einsum("ij,j...->i...", linear, grid) + np.array([1.5, -2.0, 0.5])[:, None, None, None]
    stats = metrics.jacobian_stats(affine_field.astype(np.float32))
    assert stats["log_jacobian_std"] == pytest.approx(0.0, abs=1e-5)
    assert stats["jacobian_mean"] == pytest.approx(np.linalg.det(np.eye(3) + linear), rel=1e-5)
    rng = np.random.default_rng(7)
    random_field = ndimage.gaussian_filter(rng.normal(0, 2.0, (3, *shape)), (0, 1, 1, 1)).astype(np.float32)
    expected = numpy_sdlogj(random_field)
    assert expected > 0.05
    assert metrics.jacobian_stats(random_field)["log_jacobian_std"] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- ANTs


def test_missing_antspyx_gives_a_clear_message(pairs_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` raise ImportError
    with pytest.raises(VoxregError, match=r"pip install 'voxreg\[ants\]'"):
        ev_ants.import_ants()
    result = runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(tmp_path / "out"), "--methods", "ants-syn"])
    assert_one_line_error(result, "ANTs SyN needs antspyx: pip install 'voxreg[ants]'")


def test_ants_syn_on_a_tiny_pair(tmp_path, pairs_csv):
    pytest.importorskip("ants")
    result = ev.evaluate(pairs_csv, tmp_path / "out", ["ants-syn"], ants_threads=1, examples=0)
    (row,) = result.rows
    assert row["status"] == "ok", row["error"]
    assert float(row["dice_mean"]) > float(row["dice_before"]) + 0.2
    assert float(row["ncc_after"]) > float(row["ncc_before"]) + 0.1
    assert 0.0 <= float(row["folding_percent"]) < 5.0 and float(row["sdlogj"]) > 0.0  # a real, non-zero field
    # fixed landmarks land near the moving ones (6 mm apart before); a reversed map would give ~12 mm
    assert row["tre_before_mm"] == pytest.approx(6.0) and row["tre_after_mm"] < 2.0
    settings = json.loads(row["settings"])
    assert settings["type_of_transform"] == "SyN" and settings["threads"] == 1 and int(row["threads"]) == 1
    assert settings["defaults"]["reg_iterations"] == [40, 20, 0] and settings["antspyx"]
    assert "ants.registration(fixed, moving, type_of_transform='SyN')" == settings["call"]
    assert len(result.structure_rows) == 3


def test_ants_point_map_and_converted_warp_agree(tmp_path):
    """apply_transforms_to_points (fwdtransforms) equals voxreg's composite built from the
    converted *Warp.nii.gz (fixed voxels) and the GenericAffine: Affine(Warp(p))."""
    ants = pytest.importorskip("ants")
    from voxreg import io

    paths = make_pair(tmp_path, shape=(20, 20, 20))
    fixed, moving = io.load_image(paths["fixed"]), io.load_image(paths["moving"])
    fixed_ants, moving_ants = ev_ants.to_ants_image(fixed, ants), ev_ants.to_ants_image(moving, ants)
    reg = ants.registration(fixed_ants, moving_ants, type_of_transform="SyN", outprefix=str(tmp_path / "r_"))
    warp, affine_file = reg["fwdtransforms"]
    field = ev_ants.ants_field_to_voxels(ants.image_read(warp).numpy(), fixed)
    assert field.shape == (3, 20, 20, 20) and np.abs(field).max() > 0.05
    points = ev_pairs.read_landmarks(paths["fixed_landmarks"])
    by_ants = ev_ants.ants_map_points(points, reg["fwdtransforms"], 3, ants)
    by_voxreg = methods.map_points(points, fixed.affine, field, io.read_itk_affine(affine_file))
    assert np.abs(by_ants - by_voxreg).max() < 1e-3
    assert np.abs(by_ants - ev_pairs.read_landmarks(paths["moving_landmarks"])).max() < 2.5


def test_ants_syn_2d(tmp_path):
    pytest.importorskip("ants")
    pair = make_pair(tmp_path / "data", shape=(40, 36), spacing=(1.5, 1.0))  # plane at z = 2 mm
    result = ev.evaluate(
        write_pairs_csv(tmp_path / "pairs.csv", [pair]), tmp_path / "out", ["ants-syn"], ants_threads=1, examples=0
    )
    (row,) = result.rows
    assert row["status"] == "ok", row["error"]
    assert row["dice_mean"] > row["dice_before"] + 0.2 and row["sdlogj"] > 0.0
    assert row["tre_before_mm"] == pytest.approx(4.5) and row["tre_after_mm"] < 2.0


def test_structure_table_from_a_label_file(tmp_path):
    from voxreg.evaluation.pairs import select_labels, structure_table

    table = tmp_path / "organs.csv"
    table.write_text("code,name\n1,spleen\n5,liver\n")
    assert structure_table(str(table)) == {1: "spleen", 5: "liver"}
    assert structure_table("all") is None and len(structure_table("aseg30")) == 30
    fixed = np.array([0, 1, 2, 5, 5]).reshape(1, 1, 5)
    assert select_labels(fixed, fixed, str(table)) == [1, 5]
