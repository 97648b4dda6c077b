"""Reliability matrix of `voxreg register` / `warp` / `demo`: one row per case (CLI args,
expected exit code, message fragment). Every failing row must leave the inputs unchanged
(sha256 before/after) and nothing new anywhere in the working folder (no output, no
staging folder, no lock file); every succeeding row must write finite outputs and strict
JSON. Plus SIGTERM mid-run, a full disk and two concurrent runs into one folder.

Registrations run in-process with a shortened schedule (``fast`` fixture: same pyramid
levels and windows, fewer steps) so the whole file stays well under a minute."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import smooth_volume, write_nifti
from voxreg.cli import app

runner = CliRunner()
SHAPE = (16, 16, 16)


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> sha256 of its content ('dir' for folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link->" + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def all_finite(path: Path) -> bool:
    return bool(np.all(np.isfinite(np.asarray(nib.load(str(path)).dataobj, dtype=np.float64))))


def pair(folder: Path, shape=SHAPE, spacing=(1.0, 1.0, 1.0), fixed_name="fixed.nii.gz") -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fixed = smooth_volume(shape, seed=1)
    moving = np.roll(fixed, 1, axis=0)
    affine = np.diag([*spacing[: len(shape)], *([1.0] * (3 - len(shape))), 1.0])
    labels = ((fixed > 0.4).astype(np.int32) + (fixed > 0.7)).astype(np.int32)
    return {
        "fixed": write_nifti(folder / fixed_name, fixed, affine),
        "moving": write_nifti(folder / "moving.nii.gz", moving, affine),
        "fixed_labels": write_nifti(folder / "fixed_labels.nii.gz", labels, affine),
        "moving_labels": write_nifti(folder / "moving_labels.nii.gz", np.roll(labels, 1, axis=0), affine),
    }


def nan_checkpoint(path: Path) -> Path:
    from voxreg.nn import NetworkConfig, VoxelMorph, save_checkpoint

    model = VoxelMorph(NetworkConfig(ndim=3, enc_features=(4, 4), dec_features=(4, 4, 4, 4), half_res=True))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    return save_checkpoint(path, model)


def zero_affine(path: Path) -> Path:
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 0 0 0 0 0 0 0 0 0 0 0 0\nFixedParameters: 0 0 0\n"
    )
    return path


def a_field(work: Path) -> Path:
    """field.nii.gz of a smooth non-trivial displacement on a 16^3 grid."""
    from voxreg import io
    from voxreg.core.image import Image

    grid = Image(np.zeros(SHAPE, np.float32), np.eye(4))
    x = np.linspace(0, np.pi, SHAPE[0], dtype=np.float32)
    field = np.stack([1.7 * np.sin(x)[:, None, None] * np.ones(SHAPE, np.float32)] * 3)
    (work / "reg").mkdir(exist_ok=True)
    return Path(io.save_field(work / "reg" / "field.nii.gz", field, grid))


@pytest.fixture
def fast(monkeypatch):
    """Fewer optimisation steps (same levels, windows and stages) for speed."""
    from voxreg.registration import pipeline
    from voxreg.registration.affine import AffineConfig
    from voxreg.registration.instance import AlignConfig

    def align_config(config, similarity, lam):
        return config or AlignConfig(similarity=similarity, lam=lam, iterations=(6, 4, 2))

    def affine_config(config, similarity):
        return config or AffineConfig(similarity=similarity, iterations=(6, 4, 2), init_iterations=2)

    monkeypatch.setattr(pipeline, "_align_config", align_config)
    monkeypatch.setattr(pipeline, "_affine_config", affine_config)


# --------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    name: str
    args: Callable[[Path, dict[str, Path]], list]  # (work folder, inputs) -> CLI args
    code: int
    message: str = ""
    prepare: Callable[[Path, dict[str, Path]], None] | None = None
    check: Callable[[Path, dict[str, Path]], None] | None = None


def reg(p, out, *extra):
    return ["register", p["fixed"], p["moving"], "-o", out, "--device", "cpu", *extra]


def link_input_into_output(work, p):
    """moving.nii.gz is a symlink to out/warped.nii.gz (an input living in the output folder)."""
    (work / "out").mkdir()
    target = work / "out" / "warped.nii.gz"
    p["moving"].rename(target)
    p["moving"].symlink_to(target)


def input_named_like_output(work, p):
    """The fixed scan is out/field.nii.gz: output folder == input folder."""
    (work / "out").mkdir()
    p["fixed"] = Path(p["fixed"].rename(work / "out" / "field.nii.gz"))


def singular_header(work, p):
    img = nib.load(str(p["fixed"]))
    affine = np.eye(4)
    affine[2, 2] = 0.0
    singular = nib.Nifti1Image(np.asarray(img.dataobj), None)
    singular.set_sform(affine, code=1)  # sform only: nibabel cannot write it as a qform
    singular.set_qform(None, code=0)
    nib.save(singular, str(p["fixed"]))


def shapes(shape, spacing=(1.0, 1.0, 1.0)):
    def prepare(work, p):
        p.update(pair(work / "shape", shape, spacing))

    return prepare


def finite_outputs(work, p):
    out = work / "out"
    values = strict_json(out / "metrics.json")
    for name in values["outputs"]:
        assert (out / name).exists(), name
        if name.endswith(".nii.gz"):
            assert all_finite(out / name), name
    assert not list(out.glob(".voxreg*")), list(out.iterdir())


def int_label_map(work, p):
    labels = np.random.default_rng(0).choice(np.array([0, 3, 16777217, 2147483647], np.int32), SHAPE)
    p["int_labels"] = write_nifti(work / "int_labels.nii.gz", labels.astype(np.int32))
    p["field"] = a_field(work)


def warped_label_subset(work, p):
    out = np.asarray(nib.load(str(work / "w.nii.gz")).dataobj)
    source = np.asarray(nib.load(str(p["int_labels"])).dataobj)
    assert np.issubdtype(out.dtype, np.integer), out.dtype
    assert set(np.unique(out)) <= set(np.unique(source))
    assert len(np.unique(out)) > 2


def warp_with_field(work, p):
    p["field"] = a_field(work)


def warp_with_zero_affine(work, p):
    p["field"] = a_field(work)
    zero_affine(work / "reg" / "affine.txt")


def warp_out_links_to_input(work, p):
    p["field"] = a_field(work)
    (work / "w.nii.gz").symlink_to(p["moving"])


CASES = [
    Case("lambda_nan", lambda w, p: reg(p, w / "out", "--lambda", "nan"), 2, "--lambda"),
    Case("lambda_inf", lambda w, p: reg(p, w / "out", "--lambda", "inf"), 2, "--lambda"),
    Case("lambda_negative", lambda w, p: reg(p, w / "out", "--lambda", "-1"), 2, "--lambda"),
    Case("refine_negative", lambda w, p: reg(p, w / "out", "--refine", "-1"), 2, "--refine"),
    Case("no_affine_and_affine_only", lambda w, p: reg(p, w / "out", "--no-affine", "--affine-only"), 2, "contradict"),
    Case(
        "fixed_labels_without_moving",
        lambda w, p: reg(p, w / "out", "--fixed-labels", p["fixed_labels"]),
        2,
        "--fixed-labels needs --moving-labels",
    ),
    Case(
        "input_symlinked_from_output_name",
        lambda w, p: reg(p, w / "out"),
        2,
        "would be overwritten",
        link_input_into_output,
    ),
    Case("input_named_like_output", lambda w, p: reg(p, w / "out"), 2, "would be overwritten", input_named_like_output),
    Case(
        "nan_checkpoint",
        lambda w, p: reg(p, w / "out", "--no-affine", "--model", nan_checkpoint(w / "nan.pt")),
        2,
        "NaN",
    ),
    Case("singular_header_affine", lambda w, p: reg(p, w / "out"), 2, "singular", singular_header),
    Case(
        "warp_output_is_input",
        lambda w, p: ["warp", p["field"], p["moving"], "-o", p["moving"], "--device", "cpu"],
        2,
        "would be overwritten",
        warp_with_field,
    ),
    Case(
        "warp_output_symlink_to_input",
        lambda w, p: ["warp", p["field"], p["moving"], "-o", w / "w.nii.gz", "--device", "cpu"],
        2,
        "would be overwritten",
        warp_out_links_to_input,
    ),
    Case(
        "warp_zero_affine",
        lambda w, p: ["warp", p["field"], p["moving"], "-o", w / "w.nii.gz", "--device", "cpu"],
        2,
        "singular",
        warp_with_zero_affine,
    ),
    Case(
        "warp_nearest_and_linear",
        lambda w, p: ["warp", p["field"], p["moving"], "-o", w / "w.nii.gz", "--nearest", "--linear"],
        2,
        "contradict",
        warp_with_field,
    ),
    Case("demo_nan_displacement", lambda w, p: ["demo", "-o", w / "demo", "--max-displacement", "nan"], 2, "finite"),
    # ---- succeeding rows
    Case("cube_12", lambda w, p: reg(p, w / "out"), 0, prepare=shapes((12, 12, 12)), check=finite_outputs),
    Case("thin_64x64x6", lambda w, p: reg(p, w / "out"), 0, prepare=shapes((64, 64, 6)), check=finite_outputs),
    Case(
        "anisotropic_0.5x0.5x5mm",
        lambda w, p: reg(p, w / "out"),
        0,
        prepare=shapes((24, 24, 6), (0.5, 0.5, 5.0)),
        check=finite_outputs,
    ),
    Case("image_2d_10x10", lambda w, p: reg(p, w / "out"), 0, prepare=shapes((10, 10)), check=finite_outputs),
    Case(
        "warp_int_labels_default_nearest",
        lambda w, p: ["warp", p["field"], p["int_labels"], "-o", w / "w.nii.gz", "--device", "cpu"],
        0,
        prepare=int_label_map,
        check=warped_label_subset,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matrix(case: Case, tmp_path: Path, fast):
    work = tmp_path / "work"
    p = pair(work)
    if case.prepare is not None:
        case.prepare(work, p)
    args = [str(a) for a in case.args(work, p)]
    inputs = {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in p.items() if Path(v).is_file()}
    before = snapshot(work)
    result = runner.invoke(app, args)
    text = result.output
    assert result.exit_code == case.code, text
    assert "Traceback" not in text
    assert inputs == {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in p.items() if Path(v).is_file()}
    if case.code != 0:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and case.message in lines[0], text
        assert snapshot(work) == before, "a failing run left something behind"
    if case.check is not None:
        case.check(work, p)


# --------------------------------------------------------------------------- outputs, API


def test_exact_nearest_int32_int64_labels_api():
    from voxreg import io
    from voxreg.core.image import Image

    rng = np.random.default_rng(0)
    field = torch.from_numpy(rng.normal(0, 2, (1, 3, *SHAPE)).astype(np.float32))
    for values, dtype in (([0, 3, 16777217, 2147483647], np.int32), ([0, 7, 2**40 - 1, 2**40], np.int64)):
        labels = Image(rng.choice(np.array(values, dtype), SHAPE), np.eye(4))
        out = io.resample_to(labels, labels, field=field)
        assert out.array.dtype == dtype and out.is_label
        assert set(np.unique(out.array)) == set(values)
    flat = Image(rng.choice(np.array([0, 2**31 - 1], np.int32), (10, 12)), np.diag([0.5, 2.0, 1.0, 1.0]))
    moved = io.resample_to(flat, flat, world_matrix=np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4) * 0.1)
    assert moved.array.dtype == np.int32 and set(np.unique(moved.array)) <= {0, 2**31 - 1}


def test_register_api_rejects_bad_numbers(tmp_path):
    from voxreg import register
    from voxreg.core.errors import VoxregError

    p = pair(tmp_path)
    for kwargs in ({"lam": float("nan")}, {"lam": -1.0}, {"refine": -1}, {"affine": False, "affine_only": True}):
        with pytest.raises(VoxregError):
            register(p["fixed"], p["moving"], **kwargs)


def test_stale_outputs_removed_manifest_and_figure_mode(tmp_path, fast):
    p = pair(tmp_path / "in")
    out = tmp_path / "out"
    first = runner.invoke(app, [*map(str, reg(p, out, "--moving-labels", p["moving_labels"]))])
    assert first.exit_code == 0, first.output
    assert (out / "warped_moving_labels.nii.gz").exists() and (out / "affine.txt").exists()
    old = os.umask(0o022)
    try:
        second = runner.invoke(app, [*map(str, reg(p, out, "--no-affine"))])
    finally:
        os.umask(old)
    assert second.exit_code == 0, second.output
    values = strict_json(out / "metrics.json")
    assert sorted(f.name for f in out.iterdir()) == sorted(values["outputs"])
    assert "affine.txt" not in values["outputs"] and not (out / "warped_moving_labels.nii.gz").exists()
    assert (out / "figure.png").stat().st_mode & 0o777 == 0o644


def test_metrics_json_is_strict(tmp_path):
    from voxreg.registration.outputs import write_json

    path = write_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {1: np.int64(2)}})
    assert strict_json(path) == {"a": None, "b": [None, 1.5], "c": {"1": 2}}


# --------------------------------------------------------------------------- processes


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from voxreg.cli.app import main; main()", *map(str, args)]


def test_concurrent_run_refused_then_sigterm_leaves_nothing(tmp_path):
    """A real `voxreg register` subprocess holds the folder: a second run into it fails with
    the lock message; SIGTERM to the first mid-run leaves no new file and no staging folder."""
    p = pair(tmp_path / "in", (24, 24, 24))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier file")
    before = snapshot(tmp_path)
    # 20,000 refinement steps keep the run busy for minutes: SIGTERM always arrives mid-run
    # (with the default 40 steps a 24^3 pair could finish before the signal on a fast machine).
    args = ["register", p["fixed"], p["moving"], "-o", out, "--device", "cpu", "--refine", "20000"]
    proc = subprocess.Popen(_cli(*args), stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and not list(out.glob(".voxreg-staging-*")):
        time.sleep(0.05)
    assert list(out.glob(".voxreg-staging-*")), "the run never started staging"
    second = runner.invoke(app, [str(a) for a in args])
    assert second.exit_code == 2, second.output
    assert f"another voxreg run is writing to {out}" in second.output
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
    assert snapshot(tmp_path) == before


def test_held_lock_refuses_a_run(tmp_path):
    p = pair(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".voxreg.lock", "w") as held:  # another run holding the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        result = runner.invoke(app, [*map(str, reg(p, out))])
    assert result.exit_code == 2
    assert f"another voxreg run is writing to {out}" in result.output
    assert [f.name for f in out.iterdir()] == [".voxreg.lock"]


def test_disk_full_leaves_nothing_half_written(tmp_path, fast):
    small = tmp_path / "tiny"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        p = pair(tmp_path / "in", (24, 24, 24))
        (small / "old.txt").write_text("kept")
        before = snapshot(small)
        result = runner.invoke(app, [*map(str, reg(p, small / "out"))])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert snapshot(small) == before
    finally:
        gc.collect()  # a writer that failed on ENOSPC may hold its (deleted) file until collected
        unmounted = subprocess.run(["umount", str(small)], capture_output=True)
        if unmounted.returncode != 0:
            unmounted = subprocess.run(["umount", "-l", str(small)], capture_output=True)
        assert unmounted.returncode == 0, unmounted.stderr.decode()


def test_a_failing_concurrent_write_leaves_nothing_and_says_why(tmp_path, fast, monkeypatch):
    # the NIfTI outputs are written side by side; one failing (after the others ran) still
    # leaves the output folder as it was and gives one line naming the file
    from voxreg.core.errors import VoxregError
    from voxreg.registration import outputs

    written = []

    def failing_itk_field(path, field, fixed):
        written.append(path.name)
        raise VoxregError(f"{path.name}: cannot write (disk quota exceeded)")

    monkeypatch.setattr(outputs.io, "save_itk_field", failing_itk_field)
    p = pair(tmp_path / "in", (24, 24, 24))
    out = tmp_path / "out"
    result = runner.invoke(app, [*map(str, reg(p, out))])
    assert result.exit_code == 2, result.output
    assert "field_itk.nii.gz: cannot write (disk quota exceeded)" in result.output
    assert "Traceback" not in result.output and sorted(written) == ["field_itk.nii.gz", "field_itk_inverse.nii.gz"]
    assert not out.exists() or [f.name for f in out.iterdir() if not f.name.startswith(".")] == []
