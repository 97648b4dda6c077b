"""The README demo runs end to end without ../shared: MNI152 from the nilearn wheel, a known
deformation, registration back, and the numbers it reports are real improvements."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from voxreg.cli import app
from voxreg.nn.shipped import default_model


def test_demo_recovers_the_known_deformation(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    values = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    demo = values["demo"]
    # the known deformation is smooth: its endpoint error favours a stiff refinement. Measured
    # 2026-12-04 (before 0.949 voxels): refine 40 at λ 1 -> 0.408, the default refine 20 at
    # λ 0.5 (chosen on real held-out pairs, docs/models.md) -> 0.502, at λ 1 -> 0.453
    assert demo["endpoint_error_after_voxels"] < 0.55 * demo["endpoint_error_before_voxels"]
    assert values["dice_mean_after"] > values["dice_mean_before"] + 0.1
    assert values["folding_percent"] < 0.5
    shipped = default_model(3)  # the demo runs what voxreg register runs by default
    expected = "instance-optimisation" if shipped is None else f"network+refine{shipped.card['refine']}"
    assert values["engine"] == expected and expected in result.output
    for name in (
        "warped.nii.gz",
        "warped_tissues.nii.gz",
        "field.nii.gz",
        "field_itk.nii.gz",
        "figure.png",
        "metrics.json",
    ):
        assert (out / name).stat().st_size > 0
    assert str(out) in result.output  # it says where the outputs are
