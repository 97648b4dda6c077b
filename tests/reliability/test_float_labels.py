"""Label maps saved as float32 (FreeSurfer, Mindboggle) are recognised and warped with
nearest neighbour by `voxreg warp` without flags; real float scans are not."""

import nibabel as nib
import numpy as np
import torch
from typer.testing import CliRunner

from voxreg import io
from voxreg.cli import app
from voxreg.core.image import Image


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def test_looks_like_label_map(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice([0.0, 2.0, 41.0, 1035.0], size=(12, 12, 12)).astype(np.float32)
    scan = rng.normal(100, 20, size=(12, 12, 12)).astype(np.float32)
    many_integers = rng.integers(0, 4000, size=(16, 16, 16)).astype(np.float32)  # CT-like, 2000+ values
    assert io.looks_like_label_map(_save(tmp_path / "lab.nii.gz", labels))
    assert io.looks_like_label_map(_save(tmp_path / "int.nii.gz", labels.astype(np.int16)))
    assert not io.looks_like_label_map(_save(tmp_path / "scan.nii.gz", scan))
    assert not io.looks_like_label_map(_save(tmp_path / "ct.nii.gz", many_integers))


def test_warp_without_flags_keeps_the_label_set_of_a_float_label_map(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 20, 20), np.float32)
    labels[4:16, 4:16, 4:16] = 17.0
    labels[8:12, 8:12, 8:12] = 1035.0
    labels[2:6, 10:18, 3:9] = 3.0
    src = _save(tmp_path / "labels.nii.gz", labels)
    field = torch.from_numpy(rng.normal(0, 0.8, size=(1, 3, 20, 20, 20)).astype(np.float32))
    io.save_field(tmp_path / "field.nii.gz", field, Image(np.zeros((20, 20, 20), np.float32), np.eye(4)))
    out = CliRunner().invoke(app, ["warp", str(tmp_path / "field.nii.gz"), str(src), "-o", str(tmp_path / "w.nii.gz")])
    assert out.exit_code == 0, out.output
    warped = np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)
    assert set(np.unique(warped)) == {0, 3, 17, 1035}
    linear = CliRunner().invoke(
        app, ["warp", str(tmp_path / "field.nii.gz"), str(src), "-o", str(tmp_path / "l.nii.gz"), "--linear"]
    )
    assert linear.exit_code == 0, linear.output
    assert len(np.unique(np.asarray(nib.load(str(tmp_path / "l.nii.gz")).dataobj))) > 4  # --linear forces interpolation
