"""Label names (FreeSurfer LUT), user tables, evaluation presets, left/right grouping."""

from pathlib import Path

import numpy as np
import pytest

from voxreg.core.errors import VoxregError
from voxreg.io import labels as labels

VOXELMORPH_LABELS = Path("/work/shared/data/brain_mri/voxelmorph_test_scan/labels.csv")
MINDBOGGLE_LABELS = Path("/work/shared/data/brain_mri/mindboggle_oasis_trt20/labels.csv")


@pytest.mark.parametrize(
    "code, name",
    [
        (0, "Unknown"),
        (2, "Left-Cerebral-White-Matter"),
        (10, "Left-Thalamus"),
        (17, "Left-Hippocampus"),
        (24, "CSF"),
        (49, "Right-Thalamus"),
        (63, "Right-choroid-plexus"),
        (77, "WM-hypointensities"),
        (255, "CC_Anterior"),
        (1001, "ctx-lh-bankssts"),
        (1035, "ctx-lh-insula"),
        (2024, "ctx-rh-precentral"),
        (2000, "ctx-rh-unknown"),
    ],
)
def test_label_name_known_codes(code, name):
    assert labels.label_name(code) == name


def test_label_name_unknown_code_and_numpy_int():
    assert labels.label_name(9999) == "label 9999"
    assert labels.label_name(np.int16(53)) == "Right-Hippocampus"
    assert labels.label_name(5, table={5: "mine"}) == "mine"
    assert labels.label_name(6, table={5: "mine"}) == "label 6"


def test_cortical_table_is_complete():
    table = labels.builtin_table()
    for base, hemi in ((1000, "lh"), (2000, "rh")):
        for code in range(base, base + 36):
            assert table[code].startswith(f"ctx-{hemi}-")


def test_preset_sizes_and_content():
    aseg = labels.preset("aseg30")
    assert len(aseg) == 30 and 26 not in aseg and 0 not in aseg
    assert aseg[53] == "Right-Hippocampus"
    dkt = labels.preset("DKT31")
    assert len(dkt) == 62
    assert not {1001, 1004, 1032, 1033, 2001, 2004, 2032, 2033} & set(dkt)
    everything = labels.preset("all")
    assert set(aseg) <= set(everything) and set(dkt) <= set(everything)
    with pytest.raises(VoxregError, match="aseg30"):
        labels.preset("nope")


@pytest.mark.skipif(not VOXELMORPH_LABELS.exists(), reason="VoxelMorph test scan labels.csv absent")
def test_aseg30_matches_voxelmorph_labels_npz():
    rows = labels.label_table(VOXELMORPH_LABELS)  # CSV with a header: value,name,voxels,flag
    assert rows[17] == "Left-Hippocampus"
    lines = VOXELMORPH_LABELS.read_text(encoding="utf-8").splitlines()[1:]
    in_eval = {int(line.split(",")[0]) for line in lines if line.rstrip().endswith(",1")}
    assert in_eval == set(labels.ASEG30)


@pytest.mark.skipif(not MINDBOGGLE_LABELS.exists(), reason="Mindboggle labels.csv absent")
def test_dkt31_matches_mindboggle_cortical_labels():
    lines = MINDBOGGLE_LABELS.read_text(encoding="utf-8").splitlines()[1:]
    dkt = {int(line.split(",")[0]) for line in lines if "(manual DKT31)" in line}
    assert dkt == set(labels.DKT31)


def test_label_table_freesurfer_lut_format(tmp_path):
    lut = tmp_path / "lut.txt"
    lut.write_text(
        "#$Id: FreeSurferColorLUT.txt\n#No. Label Name:  R G B A\n\n"
        "0   Unknown                 0   0   0   0\n"
        "17  Left-Hippocampus        220 216 20  0\n"
        "1035 ctx-lh-insula          255 192 32  0\n"
    )
    assert labels.label_table(lut) == {0: "Unknown", 17: "Left-Hippocampus", 1035: "ctx-lh-insula"}


def test_label_table_csv_with_and_without_header(tmp_path):
    with_header = tmp_path / "a.csv"
    with_header.write_text("code,name\n1,liver\n2, spleen\n")
    assert labels.label_table(with_header) == {1: "liver", 2: "spleen"}
    plain = tmp_path / "b.csv"
    plain.write_text('3,left kidney\n4,"right kidney"\n')
    assert labels.label_table(plain) == {3: "left kidney", 4: "right kidney"}


def test_label_table_errors(tmp_path):
    with pytest.raises(VoxregError, match="cannot read"):
        labels.label_table(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(VoxregError, match="no 'code name'"):
        labels.label_table(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,a\nx,b\n")
    with pytest.raises(VoxregError, match="line 2"):
        labels.label_table(bad)
    noname = tmp_path / "noname.txt"
    noname.write_text("7\n")
    with pytest.raises(VoxregError, match="no name"):
        labels.label_table(noname)


@pytest.mark.parametrize(
    "given, pair",
    [
        (17, "Hippocampus"),
        (53, "Hippocampus"),
        ("Left-Thalamus-Proper*", "Thalamus"),
        ("Right-Thalamus-Proper", "Thalamus"),
        (10, "Thalamus"),
        (1035, "insula"),
        (2035, "insula"),
        (16, "Brain-Stem"),
        (24, "CSF"),
        (251, "CC_Posterior"),
        ("Left_Putamen", "Putamen"),
        (9999, "label 9999"),
    ],
)
def test_hemisphere_pair_name(given, pair):
    assert labels.hemisphere_pair_name(given) == pair


def test_left_and_right_aseg30_pair_up():
    pairs = {labels.hemisphere_pair_name(code) for code in labels.ASEG30}
    assert len(pairs) == 17  # 13 bilateral structures + 3rd/4th ventricle, brain stem, CSF
    dkt_pairs = {labels.hemisphere_pair_name(code) for code in labels.DKT31}
    assert len(dkt_pairs) == 31
