"""Cohort QC of ``voxreg register-batch`` (voxreg.cohort.qc, voxreg.cohort.report,
voxreg.viz.thumbnail): the flag rules on hand-made metric dicts, the thumbnail, report.html and
the QC columns of batch.csv (resume, torchrun merge, CLI), and a real 2 mm Mindboggle cohort with
two broken pairs rendered in headless Chromium."""

from __future__ import annotations

import base64
import io as bytes_io
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA
from test_evaluation_report import CHROMEDRIVER, CHROMIUM
from voxreg.cli import app
from voxreg.cohort import qc
from voxreg.cohort.report import write_report
from voxreg.core.errors import VoxregError
from voxreg.core.image import Image
from voxreg.io import save_image, tables
from voxreg.registration import pipeline
from voxreg.registration.batch import run_batch
from voxreg.viz.thumbnail import edge_mask, edge_overlay_png, mid_slice

GOOD_DICE = (0.70, 0.72, 0.69, 0.71, 0.73, 0.68)
GOOD_NCC = (0.93, 0.94, 0.92, 0.935, 0.945, 0.925)


def _good(index: int, **changes) -> dict:
    """Metric values of a normal pair (index 0..5)."""
    values = {
        "status": "ok",
        "dice": GOOD_DICE[index],
        "ncc_before": 0.6,
        "ncc_after": GOOD_NCC[index],
        "folding_percent": 0.01,
        "sdlogj": 0.20 + 0.01 * index,
        "affine": np.eye(4),
    }
    return {**values, **changes}


def _cohort(**bad_changes) -> dict[str, dict]:
    pairs = {f"g{i}": _good(i) for i in range(6)}
    pairs["bad"] = _good(0, **bad_changes)
    return pairs


def _rotation(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = (4.0, -7.0, 12.0)
    return matrix


# --------------------------------------------------------------------------- rules


def test_robust_center_ignores_the_outlier():
    median, sd = qc.robust_center([1.0, 2.0, 3.0, 4.0, 100.0])
    assert median == 3.0 and sd == pytest.approx(1.4826)  # MAD = median(2, 1, 0, 1, 97) = 1


def test_six_good_pairs_and_one_low_dice_pair():
    reasons = qc.flag_cohort(_cohort(dice=0.45))
    assert {k for k, v in reasons.items() if v} == {"bad"}
    # 7 values: median 0.70, deviations (0.25, .02, .01, 0, .01, .02, .03): MAD 0.02
    # limit 0.70 - max(3.5 * 1.4826 * 0.02, 0.05) = 0.596
    assert reasons["bad"] == ["Dice 0.450 far below the cohort (limit 0.596)"]
    limits = qc.cohort_limits(_cohort(dice=0.45))
    assert limits["dice"] == pytest.approx(0.70 - 3.5 * 1.4826 * 0.02)


def test_normal_spread_is_not_flagged_even_when_the_cohort_is_tight():
    pairs = {f"g{i}": _good(i, dice=0.70) for i in range(6)}  # MAD 0: the absolute floor decides
    pairs["low"] = _good(0, dice=0.66)
    assert qc.flag_cohort(pairs)["low"] == []
    pairs["low"] = _good(0, dice=0.64)
    assert qc.flag_cohort(pairs)["low"] == ["Dice 0.640 far below the cohort (limit 0.650)"]


def test_low_similarity_and_high_sdlogj_and_folding():
    reasons = qc.flag_cohort(_cohort(ncc_after=0.60, sdlogj=0.9, folding_percent=1.2))["bad"]
    assert [r.split(" far")[0].split(" >")[0] for r in reasons] == [
        "NCC after 0.600",
        "SD log J 0.900",
        "folding 1.20%",
    ]
    assert not any(qc.flag_cohort(_cohort(folding_percent=0.4, sdlogj=0.25)).values())


def test_small_cohort_keeps_only_the_absolute_rules():
    pairs = {"a": _good(0), "b": _good(1), "c": _good(2, dice=0.1, folding_percent=2.0)}
    assert qc.cohort_limits(pairs) == {"dice": None, "ncc_after": None, "sdlogj": None}
    assert qc.flag_cohort(pairs)["c"] == ["folding 2.00% > 0.5%"]


def test_failed_and_pending_pairs():
    pairs = _cohort()
    pairs["broken"] = {"status": "failed", "error": "moving.nii.gz: file not found"}
    pairs["later"] = {"status": "pending"}
    reasons = qc.flag_cohort(pairs)
    assert reasons["broken"] == ["registration failed"] and reasons["later"] == []
    assert not any(reasons[f"g{i}"] for i in range(6))


def test_affine_geometry_numbers():
    geometry = qc.affine_geometry(np.diag([2.0, 1.0, 0.5, 1.0]))
    assert geometry["determinant"] == pytest.approx(1.0)
    assert geometry["singular_values"] == pytest.approx([2.0, 1.0, 0.5])
    assert geometry["shear"] == pytest.approx(0.0)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    assert qc.affine_geometry(_rotation(30) @ sheared)["shear"] == pytest.approx(0.5)
    with pytest.raises(VoxregError, match="3x3 or 4x4"):
        qc.affine_geometry(np.eye(2))


def test_affine_rules():
    assert qc.affine_reasons(_rotation(30) @ np.diag([1.1, 0.9, 1.2, 1.0])) == []
    assert qc.affine_reasons(None) == []
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])
    assert qc.affine_reasons(mirrored) == ["affine has a reflection (determinant -1.00)"]
    assert qc.affine_reasons(np.diag([1.0, 1.7, 1.0, 1.0]))[0].startswith(
        "affine scaling extreme (singular values 1.70"
    )
    assert qc.affine_reasons(np.diag([1.0, 1.0, 0.55, 1.0]))[0].endswith("allowed 0.6-1.6)")
    sheared = np.eye(4)
    sheared[1, 2] = 0.2
    assert qc.affine_reasons(sheared) == []
    sheared[1, 2] = 0.4
    assert qc.affine_reasons(sheared) == ["affine shear 0.40 > 0.3"]
    reasons = qc.flag_cohort(_cohort(affine=mirrored))
    assert reasons["bad"] == ["affine has a reflection (determinant -1.00)"]


def test_pair_values_of_a_metrics_payload():
    payload = {
        "engine": "network",
        "folding_percent": 0.02,
        "log_jacobian_std": 0.15,
        "dice_mean_after": 0.5,
        "total_seconds": 2.5,
        "similarity": {"ncc_before": 0.9, "ncc_after": 0.94, "ncc_raw": 0.6},
    }
    assert qc.pair_values(payload) == {
        "dice": 0.5,
        "ncc_before": 0.6,  # raw scans, before any alignment
        "ncc_after": 0.94,
        "folding_percent": 0.02,
        "sdlogj": 0.15,
        "engine": "network",
        "seconds": 2.5,
    }
    assert qc.pair_values({"dice_mean_after": None, "similarity": {"ncc_before": 0.8}})["ncc_before"] == 0.8


# --------------------------------------------------------------------------- thumbnail


def _box(shape=(40, 48, 20)) -> np.ndarray:
    volume = np.zeros(shape, np.float32)
    volume[8:32, 10:38, 4:16] = 1.0
    return volume


def test_mid_slice_orientation_and_pixel_size():
    volume = np.zeros((20, 30, 10), np.float32)
    volume[18, 27, 5] = 1.0  # far right, far anterior, on the axial mid-slice
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    image, pixel_mm = mid_slice(volume, affine)
    assert image.shape == (30, 20) and pixel_mm == (1.0, 1.0)  # rows: anterior -> posterior
    assert np.argwhere(image == 1).tolist() == [[2, 18]]  # top (anterior), right (patient right)
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # axes L, I, A
    flipped, _ = mid_slice(volume, lia)
    assert flipped.shape == (10, 20)  # the axial plane is now axes 0 (L) and 2 (A)


def test_edges_follow_the_fixed_boundary():
    image = np.zeros((30, 30), np.float32)
    image[10:20, 10:20] = 1.0
    edges = edge_mask(image)
    assert edges[10, 15] and edges[19, 15] and not edges[15, 15] and not edges[2, 2]
    assert not edge_mask(np.ones((8, 8))).any()


def test_edge_overlay_png():
    from PIL import Image as PilImage

    fixed = _box()
    png = edge_overlay_png(fixed, np.roll(fixed, 3, axis=0), np.diag([1.0, 1.0, 1.0, 1.0]), size=96)
    picture = np.asarray(PilImage.open(bytes_io.BytesIO(png)).convert("RGB"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and picture.shape == (96, 80, 3)  # 48 x 40 mm, longer side 96
    red = (picture[..., 0] == 255) & (picture[..., 1] == 40)
    assert 100 < red.sum() < 1500
    with pytest.raises(VoxregError, match="share one grid"):
        edge_overlay_png(fixed, fixed[:-1])


# --------------------------------------------------------------------------- report files


def _write_pair(outdir: Path, pair_id: str, values: dict) -> None:
    """A finished pair folder as register-batch leaves it (metrics.json, warped, affine.txt)."""
    from voxreg import io

    folder = outdir / pair_id
    folder.mkdir(parents=True)
    save_image(Image(np.roll(_box(), 1, axis=0), np.eye(4)), folder / "warped.nii.gz")
    io.write_itk_affine(folder / "affine.txt", values["affine"])
    metrics = {
        "engine": "instance-optimisation",
        "folding_percent": values["folding_percent"],
        "log_jacobian_std": values["sdlogj"],
        "dice_mean_after": values["dice"],
        "similarity": {"ncc_before": 0.8, "ncc_after": values["ncc_after"], "ncc_raw": values["ncc_before"]},
        "outputs": ["affine.txt", "metrics.json", "warped.nii.gz"],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def fake_batch(tmp_path) -> Path:
    """OUTDIR of a batch of 8: 6 good pairs, one with a mirrored affine, one failed."""
    fixed = save_image(Image(_box(), np.eye(4)), tmp_path / "fixed.nii.gz")
    outdir = tmp_path / "out"
    rows = []
    for pair_id, values in _cohort(affine=np.diag([-1.0, 1.0, 1.0, 1.0])).items():
        _write_pair(outdir, pair_id, values)
        rows.append({"id": pair_id, "status": "ok", "seconds": 1.5, "dice": values["dice"], "fixed": fixed})
    rows.append({"id": "lost", "status": "failed", "seconds": 0.1, "error": "m.nii.gz: <not found>", "fixed": fixed})
    columns = ("id", "status", "seconds", "dice", "error", "fixed", "moving")
    tables.write_table(outdir / "batch.csv", columns, rows)
    return outdir


def test_report_and_qc_columns(fake_batch):
    report = write_report(fake_batch)
    assert report.flagged == ["bad", "lost"]
    assert report.line().startswith("QC: 2 of 8 pairs flagged: bad, lost")
    rows = {r["id"]: r for r in tables.read_table(fake_batch / "batch.csv")}
    assert list(next(iter(rows.values())))[-2:] == ["qc_flag", "qc_reasons"]
    assert [rows[k]["qc_flag"] for k in rows] == ["0"] * 6 + ["1", "1"]
    assert rows["bad"]["qc_reasons"] == "affine has a reflection (determinant -1.00)"
    assert rows["lost"]["qc_reasons"] == "registration failed" and rows["g0"]["dice"] == "0.7"
    text = report.html.read_text(encoding="utf-8")
    body = re.search(r"<tbody>(.*)</tbody>", text, re.S).group(1)
    assert body.count("<tr") == 8 and body.count('class="flagged"') == 1 and 'class="flagged failed"' in body
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 7 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "m.nii.gz: &lt;not found&gt;" in text and "1.5" in body
    for external in ("http://", "https://", "<script", "<link", "url("):
        assert external not in text
    assert len(list((fake_batch / ".voxreg-qc").glob("*.png"))) == 7  # cached thumbnails


def test_report_twice_keeps_one_set_of_qc_columns(fake_batch):
    write_report(fake_batch)
    cached = fake_batch / ".voxreg-qc" / "g0.png"
    cached.write_bytes(b"\x89PNG cached")  # newer than warped.nii.gz: reused
    write_report(fake_batch)
    header = (fake_batch / "batch.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "id,status,seconds,dice,error,fixed,moving,qc_flag,qc_reasons"
    assert base64.b64encode(b"\x89PNG cached").decode() in (fake_batch / "report.html").read_text(encoding="utf-8")


def test_report_needs_a_batch_table(tmp_path):
    with pytest.raises(VoxregError, match="batch.csv: file not found"):
        write_report(tmp_path)


# --------------------------------------------------------------------------- wired into register-batch


def _blob(shift: int, seed: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(16.0)] * 3, indexing="ij"))
    centre = np.array([7.5 + shift, 7.5, 7.5])[:, None, None, None]
    blob = np.exp(-((grid - centre) ** 2).sum(0) / (2 * 3.0**2))
    return (blob + 0.05 * np.random.default_rng(seed).random((16,) * 3)).astype(np.float32)


@pytest.fixture
def small_pairs(tmp_path) -> Path:
    """Three 16^3 pairs (moving = fixed shifted by 1 voxel) without labels, in pairs.csv."""
    lines = ["fixed,moving,id"]
    for index in range(3):
        for role, shift in (("f", 0), ("m", 1)):
            save_image(Image(_blob(shift, 2 * index + shift), np.eye(4)), tmp_path / f"{role}{index}.nii.gz")
        lines.append(f"f{index}.nii.gz,m{index}.nii.gz,p{index}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def _quick(fixed, moving, **kwargs):
    return pipeline.register(fixed, moving, config=pipeline.AlignConfig(iterations=(4, 2, 1)), **kwargs)


def test_torchrun_ranks_rewrite_the_report(small_pairs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    options = {"engine": "instance", "affine": False, "figure": False, "register": _quick, "on_merged": write_report}
    monkeypatch.setenv("RANK", "1")
    summary = run_batch(small_pairs, out, **options)
    assert summary.merged.reasons == {"p0": [], "p1": [], "p2": []}
    assert [r["qc_flag"] for r in tables.read_table(out / "batch.csv")] == ["", "0", ""]  # p0, p2 pending
    monkeypatch.setenv("RANK", "0")
    run_batch(small_pairs, out, **options)
    assert [r["qc_flag"] for r in tables.read_table(out / "batch.csv")] == ["0", "0", "0"]
    assert (out / "report.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def test_cli_writes_the_report_and_rewrites_it_on_resume(small_pairs, tmp_path):
    out = tmp_path / "out"
    args = ["register-batch", str(small_pairs), "-o", str(out), "--engine", "instance", "--no-affine", "--no-figure"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "QC: 0 of 3 pairs flagged" in result.output
    (out / "report.html").unlink()
    result = CliRunner().invoke(app, args)  # every pair done before: skipped, report rewritten
    assert result.exit_code == 0 and "3 skipped" in result.output
    rows = tables.read_table(out / "batch.csv")
    assert [(r["status"], r["qc_flag"]) for r in rows] == [("skipped", "0")] * 3
    assert (out / "report.html").read_text(encoding="utf-8").count('<tr id="pair-') == 3
    result = CliRunner().invoke(app, [*args, "--no-report", "-o", str(tmp_path / "plain")])
    assert result.exit_code == 0 and not (tmp_path / "plain" / "report.html").exists()
    assert "qc_flag" not in (tmp_path / "plain" / "batch.csv").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- real cohort

MINDBOGGLE = SHARED_DATA / "brain_mri" / "mindboggle_oasis_trt20"
BODY_CT = SHARED_DATA / "ct" / "totalsegmentator_example" / "example_ct_sm.nii.gz"
GOOD_PAIRS = [(f, f + 1) for f in range(1, 16, 2)]  # the 8 recommended disjoint pairs, 2 -> 1 ...
SCREENSHOT = os.environ.get("VOXREG_QC_SCREENSHOT")  # also save the screenshot there (evidence)


def _downsampled(path: Path, label: bool) -> nib.Nifti1Image:
    """A 1 mm scan at 2 mm: 2x2x2 block means (labels: every second voxel), header to match."""
    image = nib.load(path)
    array = np.asarray(image.dataobj)
    array = array[tuple(slice(0, s - s % 2) for s in array.shape)]
    if label:
        array = array[::2, ::2, ::2].astype(np.int16)
    else:
        shape = [s // 2 for s in array.shape]
        array = array.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean((1, 3, 5)).astype(np.float32)
    affine = image.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] += image.affine[:3, :3] @ np.full(3, 0.5)  # labels: nearest voxel of each block
    return nib.Nifti1Image(array, affine)


def _subject(data: Path, number: int, mirror: bool = False) -> tuple[str, str]:
    """Write subject ``number`` at 2 mm (``mirror``: array and labels flipped left-right, header
    unchanged); returns the image and label file names."""
    names = []
    for kind, label in (("t1weighted_brain", False), ("labels_DKT31_CMA", True)):
        image = _downsampled(MINDBOGGLE / f"OASIS-TRT-20-{number}" / f"{kind}.nii.gz", label)
        array = np.asarray(image.dataobj)
        if mirror:
            left_right = int(np.argmax(np.abs(image.affine[0, :3])))  # the array axis along R-L
            array = np.flip(array, left_right).copy()
        name = f"s{number}{'m' if mirror else ''}_{kind}.nii"
        nib.save(nib.Nifti1Image(array, image.affine), str(data / name))
        names.append(name)
    return names[0], names[1]


@pytest.fixture(scope="module")
def real_cohort(tmp_path_factory):
    """register-batch (shipped network, affine first) on 8 Mindboggle pairs at 2 mm plus two
    broken pairs: a body CT as moving scan, and a brain mirrored left-right in its array only."""
    if not MINDBOGGLE.is_dir() or not BODY_CT.is_file():
        pytest.skip(f"shared data not available: {MINDBOGGLE} / {BODY_CT}")
    data = tmp_path_factory.mktemp("cohort_data")
    lines = ["fixed,moving,fixed_labels,moving_labels,id"]
    for fixed, moving in GOOD_PAIRS:
        (fi, fl), (mi, ml) = _subject(data, fixed), _subject(data, moving)
        lines.append(f"{fi},{mi},{fl},{ml},pair{fixed:02d}")
    shutil.copy(BODY_CT, data / "body_ct.nii.gz")
    lines.append("s3_t1weighted_brain.nii,body_ct.nii.gz,,,ct_moving")
    mi, ml = _subject(data, 4, mirror=True)
    lines.append(f"s3_t1weighted_brain.nii,{mi},s3_labels_DKT31_CMA.nii,{ml},mirrored")
    (data / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("cohort_out")
    options = {"engine": "network", "refine": 0, "figure": False, "device": "cpu"}
    summary = run_batch(data / "pairs.csv", out, on_merged=write_report, **options)
    assert summary.failed == 0, summary.rows
    return out, summary.merged


@pytest.mark.slow
def test_real_cohort_flags_exactly_the_broken_pairs(real_cohort):
    out, report = real_cohort
    assert report.flagged == ["ct_moving", "mirrored"]
    assert any(r.startswith("NCC after") for r in report.reasons["ct_moving"])
    assert report.reasons["mirrored"][0].startswith("Dice 0.0")  # left labels on the right hemisphere
    rows = {r["id"]: r for r in tables.read_table(out / "batch.csv")}
    assert all(float(rows[f"pair{f:02d}"]["dice"]) > 0.4 for f, _ in GOOD_PAIRS)
    assert sum(r["qc_flag"] == "1" for r in rows.values()) == 2 and len(rows) == 10


def _chromium(profile: Path, width: int, height: int):
    """Headless Chromium through the system chromedriver, with a fresh profile (skips when absent)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'voxreg[test]')")
    browser = next((b for b in CHROMIUM if Path(b).exists()), None)
    if browser is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("chromium or chromedriver not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument("--hide-scrollbars")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_real_cohort_report_in_headless_chromium(real_cohort, tmp_path):
    from PIL import Image as PilImage

    out, _ = real_cohort
    driver = _chromium(tmp_path / "profile", 1400, 1700)
    try:
        driver.set_page_load_timeout(15)
        driver.get((out / "report.html").resolve().as_uri())
        state = driver.execute_script("""
            const rows = Array.from(document.querySelectorAll('#pairs tbody tr'));
            return {rows: rows.length,
                    flagged: rows.filter(r => r.classList.contains('flagged')).map(r => r.id),
                    background: rows.map(r => getComputedStyle(r).backgroundColor),
                    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth])};""")
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert state["rows"] == 10 and state["flagged"] == ["pair-ct_moving", "pair-mirrored"]
    assert state["background"].count("rgb(253, 226, 226)") == 2  # the two flagged rows are tinted
    assert len(state["images"]) == 10 and all(done and width > 50 for done, width in state["images"])
    shot = np.asarray(PilImage.open(tmp_path / "report.png").convert("RGB")).astype(int)
    assert shot.std() > 30  # not blank: text, thumbnails
    tinted = (np.abs(shot - [253, 226, 226]).sum(-1) < 6).sum(0)
    assert (tinted > 0).sum() > 500  # flagged rows visible across the page width
    if SCREENSHOT:
        shutil.copy(tmp_path / "report.png", SCREENSHOT)
