"""voxreg evaluate: pairs CSV checks, HD95 and TRE on hand-computable cases, end-to-end runs
through the CLI (affine, instance, ANTs SyN), resume, failures recorded per row, atomic CSVs."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from conftest import smooth_volume, write_nifti
from voxreg.evaluation import runner as ev
from voxreg.cli import app
from voxreg.core.errors import VoxregError

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


def make_pair(folder: Path, shape=(24, 24, 24), shift=SHIFT, spacing=SPACING, name="a",
              landmarks=True) -> dict[str, Path]:
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
        paths["fixed_landmarks"] = write_points(folder / f"{name}_fixed_points.csv", voxels @ affine[:3, :3].T + affine[:3, 3])
        paths["moving_landmarks"] = write_points(folder / f"{name}_moving_points.csv", moved @ affine[:3, :3].T + affine[:3, 3])
    return paths


def write_pairs_csv(path: Path, pairs: list[dict[str, Path]], relative: bool = True) -> Path:
    columns = [c for c in ev.PAIR_COLUMNS[1:] if c in pairs[0]]
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
    (pair,) = ev.read_pairs(pairs_csv)
    assert pair.id == "a_moving_to_a_fixed"
    assert pair.fixed == pairs_csv.parent / "data" / "a_fixed.nii.gz" and pair.fixed.exists()
    assert pair.moving_landmarks.name == "a_moving_points.csv"
    points = ev.read_landmarks(pair.fixed_landmarks)
    assert points.shape == (4, 3) and points[0].tolist() == pytest.approx([10.0, 17.0, 20.0])


@pytest.mark.parametrize("header, row, message", [
    ("moving", "data/a_moving.nii.gz", "fixed,moving (missing fixed"),
    ("fixed,moving,colour", "data/a_fixed.nii.gz,data/a_moving.nii.gz,red", "unknown column(s) colour"),
    ("fixed,moving", "data/a_fixed.nii.gz,data/nope.nii.gz", "line 2: moving file not found"),
    ("fixed,moving", "data/a_fixed.nii.gz,", "line 2: empty 'moving' path"),
    ("fixed,moving,fixed_labels", "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_labels.nii.gz",
     "fixed_labels and moving_labels must be given together"),
    ("fixed,moving,fixed_landmarks,moving_landmarks",
     "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_points.csv,data/short.csv", "has 4 landmarks but"),
    ("fixed,moving,fixed_landmarks,moving_landmarks",
     "data/a_fixed.nii.gz,data/a_moving.nii.gz,data/a_fixed_points.csv,data/bad.csv", "needs a header with x,y,z"),
    ("id,fixed,moving", "p,data/a_fixed.nii.gz,data/a_moving.nii.gz\np,data/a_fixed.nii.gz,data/a_moving.nii.gz",
     "line 3: id 'p' already used on line 2"),
    ("fixed,moving", "", "no pairs"),
])
def test_bad_pairs_csv_is_one_clear_error(tmp_path, header, row, message):
    make_pair(tmp_path / "data")
    write_points(tmp_path / "data" / "short.csv", np.zeros((2, 3)))
    (tmp_path / "data" / "bad.csv").write_text("a,b,c\n1,2,3\n")
    path = tmp_path / "pairs.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(VoxregError, match=None) as info:
        ev.read_pairs(path)
    assert str(path) in str(info.value) or "data" in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    result = runner.invoke(app, ["evaluate", str(path), "-o", str(tmp_path / "out"), "--methods", "affine"])
    assert_one_line_error(result, message)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_bad_options_fail_before_any_work(pairs_csv, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "affine,magic"]),
                          "unknown method(s) magic")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "network"]),
                          "need --model")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "affine",
                                              "--structures", "aseg99"]), "unknown label preset 'aseg99'")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "instance",
                                              "--exclude-labels", "0,x"]), "--exclude-labels must be a comma list")
    assert not (out / "results.csv").exists()


# --------------------------------------------------------------------------- HD95


def cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def reference_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """MONAI's algorithm written out: surfaces by face-connected erosion, scipy EDT."""
    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    def directed(x, y):
        return np.percentile(ndimage.distance_transform_edt(~surface(y), sampling=spacing)[surface(x)], 95)

    return float(max(directed(a, b), directed(b, a)))


def test_hd95_hand_cases():
    shape = (30, 20, 20)
    a, b = cube(shape, (5, 5, 5), 10), cube(shape, (8, 5, 5), 10)
    assert ev.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # 3 voxels of 2 mm along axis 0
    assert ev.hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert ev.hd95(a, a, (2.0, 1.0, 1.0)) == 0.0
    assert np.isnan(ev.hd95(a, np.zeros(shape, bool), (1.0, 1.0, 1.0)))
    single_a, single_b = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    single_a[2, 2], single_b[5, 6] = True, True  # 2D, offset (3, 4) voxels
    assert ev.hd95(single_a, single_b, (1.0, 1.0)) == pytest.approx(5.0)
    # cubes touching the image border have a surface there: faces x=0 and x=2 are 2 voxels apart
    assert ev.hd95(cube(shape, (0, 0, 0), 6), cube(shape, (2, 0, 0), 6), (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_hd95_matches_monai_definition_on_irregular_shapes():
    volume = smooth_volume((28, 24, 20), seed=3)
    a, b = volume > 0.35, np.roll(volume, (2, -1, 1), axis=(0, 1, 2)) > 0.45
    spacing = (1.2, 0.8, 2.5)
    assert ev.hd95(a, b, spacing) == pytest.approx(reference_hd95(a, b, spacing), abs=1e-4)


def test_structure_scores_crop_each_label_like_whole_volume_hd95():
    labels = np.zeros((30, 26, 22), np.int32)
    labels[4:14, 5:15, 5:15], labels[16:26, 8:20, 3:12], labels[:2] = 17, 1002, -4
    warped = np.roll(labels, (2, 1, 0), axis=(0, 1, 2))
    warped[warped == 17] = 0  # 17 lost by the warp: Dice 0, HD95 undefined
    spacing = (1.5, 1.0, 0.8)
    scores = ev.structure_scores(labels, warped, [0, 17, 1002, -4, 99], spacing)
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
    mapped = ev.map_points(np.array([[4.0, 3.0, 2.0]]), affine, field, world)
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
    result = runner.invoke(app, ["evaluate", str(pairs_csv), "-o", str(out), "--methods", "affine,instance",
                                 "--iterations", "6,4,2", "--device", "cpu", "--examples", "1",
                                 "--structures", "aseg30"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(ev.RESULT_COLUMNS)
    assert [(r["id"], r["method"], r["status"]) for r in rows] == [
        ("a_moving_to_a_fixed", "affine", "ok"), ("a_moving_to_a_fixed", "instance", "ok")]
    for row in rows:
        assert float(row["dice_mean"]) >= float(row["dice_before"]) + 0.2
        assert float(row["ncc_after"]) > float(row["ncc_before"])
        assert float(row["tre_after_mm"]) < 1.5 < float(row["tre_before_mm"])
        assert float(row["folding_percent"]) < 1.0 and float(row["sdlogj"]) >= 0.0
        assert float(row["seconds"]) > 0 and float(row["peak_memory_mb"]) >= 0
        assert row["device"] == "cpu" and int(row["threads"]) >= 1
    instance = json.loads(rows[1]["settings"])
    assert instance["engine"] == "instance-optimisation"
    assert instance["align_config"]["iterations"] == [6, 4, 2] and instance["align_config"]["scales"] == [4, 2, 1]
    structures = read_csv(out / "per_structure.csv")
    # label 1 is present in both maps but not in aseg30; 17 and 53 are
    assert sorted((r["method"], r["label"], r["name"]) for r in structures) == [
        ("affine", "17", "Left-Hippocampus"), ("affine", "53", "Right-Hippocampus"),
        ("instance", "17", "Left-Hippocampus"), ("instance", "53", "Right-Hippocampus")]
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["hd95_mm"]) >= 0.0 for r in structures)
    assert sorted(p.name for p in (out / "examples").iterdir()) == [
        "a_moving_to_a_fixed_affine.png", "a_moving_to_a_fixed_instance.png"]
    assert "2 run, 0 already done, 0 failed" in result.output
    if importlib.util.find_spec("voxreg.evaluation_report") is not None:  # the report is written from the CSVs
        assert (out / "table.md").exists() and "affine" in (out / "table.md").read_text()
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
    model = save_checkpoint(tmp_path / "tiny.pt", VoxelMorph(NetworkConfig(
        ndim=3, enc_features=(4, 4), dec_features=(4, 4, 4, 4), half_res=True)))
    assert ev.resolve_methods(None, model) == ["affine", "ants-syn", "instance", "network", "network-refine"]
    assert ev.resolve_methods(None, None) == ["affine", "ants-syn", "instance"]
    result = ev.evaluate(pairs_csv, tmp_path / "out", "network,network-refine", model=model, refine=6,
                         device="cpu", examples=0)
    network, refined = result.rows
    assert network["status"] == refined["status"] == "ok", (network["error"], refined["error"])
    assert json.loads(network["settings"])["engine"] == "network"
    assert json.loads(refined["settings"])["engine"] == "network+refine6"
    assert json.loads(refined["settings"])["model"] == str(model)
    for row in (network, refined):  # the affine stage already aligns this shifted pair
        assert row["dice_mean"] > row["dice_before"] + 0.2 and row["tre_after_mm"] < row["tre_before_mm"]
        assert 0.0 <= row["folding_percent"] < 5.0


# --------------------------------------------------------------------------- resume and failures


def fake_method(calls: list[str], fail_first: bool = False):
    """An identity 'registration' that counts its calls (and raises on the first if asked)."""

    def run(data: ev.PairData, options: ev.EvaluationOptions) -> ev.MethodOutput:
        calls.append(data.pair.id)
        if fail_first and len(calls) == 1:
            raise RuntimeError("boom\non two lines")
        field = np.zeros((data.fixed.ndim, *data.fixed.shape), np.float32)
        warped = ev.io.resample_to(data.moving, data.fixed)
        labels = ev.io.resample_to(data.moving_labels, data.fixed, nearest=True)
        return ev.MethodOutput(warped=warped, field=field, map_points=lambda p: p, seconds=0.01,
                               warped_labels=labels, settings={"fake": True})

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
    second = ev.evaluate(path, tmp_path / "out", ["fake"], device="cpu", examples=0,
                         progress=lambda done, total, row: progress.append((done, total)))
    assert calls == ["a_moving_to_a_fixed", "b_moving_to_b_fixed", "a_moving_to_a_fixed"]  # only the failed one
    assert (second.ran, second.skipped, second.failed) == (1, 1, 0)
    assert progress[-1] == (2, 2)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert sorted((r["id"], r["status"]) for r in rows) == [("a_moving_to_a_fixed", "ok"), ("b_moving_to_b_fixed", "ok")]
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
    result = runner.invoke(app, ["evaluate", str(path), "-o", str(tmp_path / "out"), "--methods", "instance,affine",
                                 "--examples", "0"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [(r["method"], r["status"], r["error"]) for r in rows] == [
        ("instance", "failed", "ValueError: the optimiser diverged"), ("affine", "ok", "")]
    assert rows[0]["dice_mean"] == "" and float(rows[1]["dice_mean"]) > 0.0
    assert "failed: a_moving_to_a_fixed instance: ValueError: the optimiser diverged" in result.output


def test_an_unreadable_pair_fails_its_rows_only(tmp_path, monkeypatch):
    good = make_pair(tmp_path / "data", name="a", landmarks=False, shape=(12, 12, 12))
    bad = make_pair(tmp_path / "data", name="b", landmarks=False, shape=(12, 12, 12))
    bad["moving"].write_bytes(b"not a nifti")
    calls: list[str] = []
    monkeypatch.setitem(ev.METHODS, "fake", fake_method(calls))
    result = ev.evaluate(write_pairs_csv(tmp_path / "pairs.csv", [bad, good]), tmp_path / "out", ["fake"],
                         device="cpu", examples=0)
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

    monkeypatch.setattr(ev, "_csv_value", interrupted)
    store = ev.ResultStore(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        store.add({"id": "x", "method": "fake", "status": "ok"}, [])
    assert (tmp_path / "out" / "results.csv").read_bytes() == before
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # temporary file removed


def test_peak_memory_sees_a_large_allocation():
    with ev.PeakMemory("cpu") as memory:
        block = np.ones(64 * 2 ** 20 // 8)  # 64 MB, touched
        block.sum()
        import time
        time.sleep(0.1)
        del block
    assert 50.0 < memory.peak_mb < 200.0


# --------------------------------------------------------------------------- ANTs


def test_missing_antspyx_gives_a_clear_message(pairs_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` raise ImportError
    with pytest.raises(VoxregError, match=r"pip install 'voxreg\[ants\]'"):
        ev.import_ants()
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
    fixed_ants, moving_ants = ev.to_ants_image(fixed, ants), ev.to_ants_image(moving, ants)
    reg = ants.registration(fixed_ants, moving_ants, type_of_transform="SyN", outprefix=str(tmp_path / "r_"))
    warp, affine_file = reg["fwdtransforms"]
    field = ev.ants_field_to_voxels(ants.image_read(warp).numpy(), fixed)
    assert field.shape == (3, 20, 20, 20) and np.abs(field).max() > 0.05
    points = ev.read_landmarks(paths["fixed_landmarks"])
    by_ants = ev.ants_map_points(points, reg["fwdtransforms"], 3, ants)
    by_voxreg = ev.map_points(points, fixed.affine, field, io.read_itk_affine(affine_file))
    assert np.abs(by_ants - by_voxreg).max() < 1e-3
    assert np.abs(by_ants - ev.read_landmarks(paths["moving_landmarks"])).max() < 2.5


def test_ants_syn_2d(tmp_path):
    pytest.importorskip("ants")
    pair = make_pair(tmp_path / "data", shape=(40, 36), spacing=(1.5, 1.0))  # plane at z = 2 mm
    result = ev.evaluate(write_pairs_csv(tmp_path / "pairs.csv", [pair]), tmp_path / "out", ["ants-syn"],
                         ants_threads=1, examples=0)
    (row,) = result.rows
    assert row["status"] == "ok", row["error"]
    assert row["dice_mean"] > row["dice_before"] + 0.2 and row["sdlogj"] > 0.0
    assert row["tre_before_mm"] == pytest.approx(4.5) and row["tre_after_mm"] < 2.0


def test_structure_table_from_a_label_file(tmp_path):
    from voxreg.evaluation.runner import select_labels, structure_table

    table = tmp_path / "organs.csv"
    table.write_text("code,name\n1,spleen\n5,liver\n")
    assert structure_table(str(table)) == {1: "spleen", 5: "liver"}
    assert structure_table("all") is None and len(structure_table("aseg30")) == 30
    fixed = np.array([0, 1, 2, 5, 5]).reshape(1, 1, 5)
    assert select_labels(fixed, fixed, str(table)) == [1, 5]
