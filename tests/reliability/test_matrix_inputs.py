"""Reliability matrix of bad inputs to ``train``, ``preprocess``, ``evaluate`` and ``tune-lambda``.

One row per case: the command's arguments (built from the input folder and an output folder),
the expected exit code and a fragment of the expected message. For every row the command
must also print no traceback and no warning, leave every input byte-for-byte unchanged
(sha256) and, when it fails, leave nothing in the output folder.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tests.conftest import Args, Case
from typer.testing import CliRunner

from voxreg.cli import app

runner = CliRunner()
SHAPE = (12, 12, 12)


def _volume(seed: int) -> np.ndarray:
    """A smooth positive 12^3 test volume."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in SHAPE], indexing="ij")
    out = sum(np.exp(-sum((g - c) ** 2 for g, c in zip(grids, rng.uniform(0.3, 0.7, 3))) / 0.05) for _ in range(3))
    return (out / out.max()).astype(np.float32)


def _nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _dicom_series(folder: Path, uid: str, description: str, slices: int) -> None:
    """A tiny DICOM series (8x8 slices) written with SimpleITK."""
    for i in range(slices):
        img = sitk.GetImageFromArray((np.random.default_rng(i).random((8, 8)) * 100).astype(np.int16))
        tags = {
            "0020|000e": uid,
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|0032": f"0\\0\\{i}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(i + 1),
            "0008|0060": "MR",
        }
        for tag, value in tags.items():
            img.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{description}_{i}.dcm"))
        writer.Execute(img)


def _corrupt_header(path: Path, shape: tuple[int, ...]) -> None:
    """An uncompressed NIfTI whose header claims ``shape`` but which holds 400 bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4 + np.zeros(100, np.float32).tobytes())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input file of the matrix, in one folder."""
    d = tmp_path_factory.mktemp("inputs")
    a, b = _volume(1), _volume(2)
    _nifti(d / "a.nii.gz", a)
    _nifti(d / "b.nii.gz", b)
    _nifti(d / "a_labels.nii.gz", (a > 0.5).astype(np.int16))
    _nifti(d / "b_labels.nii.gz", (b > 0.5).astype(np.int16))
    complex_volume = (a + 1j * b).astype(np.complex64)
    _nifti(d / "complex.nii.gz", complex_volume)
    np.savez(d / "complex.npz", vol=complex_volume)
    sitk.WriteImage(sitk.GetImageFromArray(complex_volume), str(d / "complex.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(complex_volume), str(d / "complex.mha"))
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = (a * 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(d / "rgb.nii.gz"))  # NIfTI datatype RGB24
    (d / "garbage.mgz").write_bytes(np.random.default_rng(0).bytes(4096))
    _nifti(d / "voxel.nii.gz", np.ones((1, 1, 1), np.float32))
    _corrupt_header(d / "huge.nii", (30000, 30000, 30000))
    _corrupt_header(d / "truncated.nii", (1000, 1000, 1000))
    (d / "series").mkdir()
    _dicom_series(d / "series", "1.2.826.0.1.3680043.2.1125.10", "T1w", 3)
    _dicom_series(d / "series", "1.2.826.0.1.3680043.2.1125.20", "FLAIR", 4)
    (d / "bad_cache.pt").write_bytes(b"this is not a torch file")
    torch.save({"weights": torch.zeros(3)}, d / "other_cache.pt")
    (d / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels\na.nii.gz,b.nii.gz,a_labels.nii.gz,b_labels.nii.gz\n"
    )
    (d / "val.csv").write_text("a.nii.gz,a_labels.nii.gz\nb.nii.gz,b_labels.nii.gz\n")
    return d


# Case(id, args, exit, message): args maps (input folder, output folder) to a command line


def train(*extra: str, scans: tuple[str, ...] = ("a.nii.gz", "b.nii.gz")) -> Args:
    return lambda d, o: ["train", *(str(d / s) for s in scans), "-o", str(o), "--steps", "1", "--device", "cpu", *extra]


def train_cache(name: str) -> Args:
    return lambda d, o: [*train()(d, o), "--cache", str(d / name)]


def preprocess(*extra: str, scans: tuple[str, ...] = ("b.nii.gz",)) -> Args:
    return lambda d, o: [
        "preprocess",
        *(str(d / s) for s in scans),
        "-o",
        str(o),
        "--atlas",
        str(d / "a.nii.gz"),
        "--multiple",
        "4",
        *extra,
    ]


def evaluate(*extra: str) -> Args:
    return lambda d, o: [
        "evaluate",
        str(d / "pairs.csv"),
        "-o",
        str(o),
        "--methods",
        "affine",
        "--device",
        "cpu",
        *extra,
    ]


def tune(*extra: str) -> Args:
    return lambda d, o: [
        "tune-lambda",
        str(d / "model.pt"),
        str(d / "val.csv"),
        "-o",
        str(o),
        "--device",
        "cpu",
        *extra,
    ]


CASES = [
    # 1. --dice-weight without label maps
    Case("dice-weight-no-labels", train("--dice-weight", "1"), 2, "--dice-weight needs label maps"),
    # 2. bad training caches
    Case("cache-not-torch", train_cache("bad_cache.pt"), 2, "not a voxreg training cache"),
    Case("cache-other-torch-file", train_cache("other_cache.pt"), 2, "not a voxreg training cache"),
    Case("cache-text-file", train_cache("pairs.csv"), 2, "not a voxreg training cache"),
    # 3. complex-valued images, every reader
    Case("complex-nifti", train(scans=("complex.nii.gz", "a.nii.gz")), 2, "complex.nii.gz: complex-valued image"),
    Case("complex-npz", train(scans=("complex.npz", "a.nii.gz")), 2, "complex.npz: complex-valued image"),
    Case("complex-nrrd", train(scans=("complex.nrrd", "a.nii.gz")), 2, "complex.nrrd: complex-valued image"),
    Case("complex-mha", train(scans=("complex.mha", "a.nii.gz")), 2, "complex.mha: 2 components per voxel (complex"),
    Case("complex-label-map", preprocess("--labels", "{d}/complex.nii.gz"), 2, "complex-valued image"),
    # 4. several DICOM series in one folder
    Case(
        "dicom-several-series",
        preprocess(scans=("series",)),
        2,
        "folder holds 2 DICOM series: 1.2.826.0.1.3680043.2.1125.10 (3 files, 'T1w'); "
        "1.2.826.0.1.3680043.2.1125.20 (4 files, 'FLAIR'); pass a folder with one series",
    ),
    # 5. preprocess where every scan fails
    Case("preprocess-all-fail", preprocess(scans=("garbage.mgz", "voxel.nii.gz")), 2, "all 2 scans failed"),
    # 6. --structures: a missing file vs a preset
    Case("structures-missing-file", evaluate("--structures", "missing.txt"), 2, "missing.txt: file not found"),
    Case("structures-unknown-preset", evaluate("--structures", "aseg99"), 2, "unknown label preset 'aseg99'"),
    Case("structures-preset", evaluate("--structures", "aseg30"), 0, "1 run, 0 already done, 0 failed"),
    # 7. unreadable / impossible images
    Case("rgb-nifti", train(scans=("rgb.nii.gz", "a.nii.gz")), 2, "rgb.nii.gz: colour/multi-component image"),
    Case(
        "garbage-mgz",
        train(scans=("garbage.mgz", "a.nii.gz")),
        2,
        "garbage.mgz: cannot read as MGH/MGZ: not a gzip-compressed file",
    ),
    Case("one-voxel", train(scans=("voxel.nii.gz", "a.nii.gz")), 2, "voxel.nii.gz: image of shape 1x1x1 is 1D"),
    Case("huge-header", train(scans=("huge.nii", "a.nii.gz")), 2, "huge.nii: header claims a 30000x30000x30000"),
    Case("truncated-file", train(scans=("truncated.nii", "a.nii.gz")), 2, "the file is truncated or its header"),
    Case("preprocess-tiny-spacing", preprocess("--spacing", "0.01"), 2, "spacing 0.01 mm gives a 1200x1200x1200"),
    # 8. NaN / Inf / negative numeric options
    Case("train-lr-nan", train("--lr", "nan"), 2, "--lr must be a finite number > 0, got nan"),
    Case("train-steps-negative", train("--steps", "-1"), 2, "--steps must be an int >= 1, got -1"),
    Case("train-lambda-inf", train("--lambda", "inf"), 2, "--lambda must be a finite number >= 0, got inf"),
    Case("train-voxel-size-nan", train("--voxel-size", "nan"), 2, "--voxel-size must be a finite number > 0"),
    Case("preprocess-spacing-inf", preprocess("--spacing", "inf"), 2, "spacing must be a finite positive number"),
    Case("preprocess-spacing-negative", preprocess("--spacing", "-1"), 2, "spacing must be a finite positive number"),
    Case("preprocess-window-inf", preprocess("--window", "0", "inf"), 2, "window must be two finite numbers"),
    Case("evaluate-lambda-nan", evaluate("--lambda", "nan"), 2, "--lambda must be a finite number >= 0, got nan"),
    Case("evaluate-refine-negative", evaluate("--refine", "-1"), 2, "--refine must be an integer >= 1"),
    Case("evaluate-iterations-negative", evaluate("--iterations", "-5"), 2, "--iterations takes steps >= 0"),
    Case("evaluate-examples-negative", evaluate("--examples", "-1"), 2, "--examples must be an integer >= 0"),
    Case("tune-max-folding-nan", tune("--max-folding", "nan"), 2, "--max-folding must be a finite number >= 0"),
    Case("tune-lambdas-nan", tune("--lambdas", "1,nan"), 2, "--lambdas must be a finite number > 0, got nan"),
    Case("tune-lambdas-negative", tune("--lambdas", "-1"), 2, "--lambdas must be a finite number > 0, got -1"),
    Case("tune-num-one", tune("--num", "1"), 2, "--num must be an integer >= 2"),
]


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_input_matrix(case: Case, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [a.replace("{d}", str(inputs)) for a in case.args(inputs, out)]
    before = _hashes(inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, args)
    text = result.output  # stdout and stderr interleaved
    assert result.exit_code == case.exit, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    assert case.message in " ".join(text.split()), text
    if case.exit == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("voxreg: error:")]
        assert len(errors) == 1, result.stderr
    assert not [w for w in caught if not issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]
    assert _hashes(inputs) == before, "an input file was changed"
    if case.exit != 0:
        assert not out.exists() or not os.listdir(out), sorted(os.listdir(out))
