"""registration.outputs.stage_measures: the figure's title and the command's summary line name
the same stages for NCC and Dice (raw moving scan, after the affine stage, after registration),
although metrics.json names them differently for the two measures."""

from voxreg.registration.outputs import figure_title, stage_measures


def _values(engine: str, raw: bool = True) -> dict:
    similarity = {"ncc_before": 0.855, "ncc_after": 0.947} | ({"ncc_raw": 0.546} if raw else {})
    dice = {"dice_mean_before": 0.015, "dice_mean_after": 0.597} | ({"dice_mean_affine": 0.415} if raw else {})
    return {"engine": engine, "similarity": similarity, "folding_percent": 0.0, **dice}


def test_affine_then_deformable_shows_three_stages_for_both_measures():
    assert stage_measures(_values("network")) == [
        "NCC 0.546 -> 0.855 (affine) -> 0.947",
        "Dice 0.015 -> 0.415 (affine) -> 0.597",
    ]
    assert figure_title(_values("network")) == (
        "network   NCC 0.546 -> 0.855 (affine) -> 0.947   Dice 0.015 -> 0.415 (affine) -> 0.597   folding 0.000%"
    )


def test_affine_only_and_no_affine_stage_show_two():
    affine_only = _values("affine")
    affine_only["similarity"]["ncc_after"] = affine_only["similarity"]["ncc_before"]
    affine_only["dice_mean_after"] = affine_only["dice_mean_affine"]
    assert stage_measures(affine_only) == ["NCC 0.546 -> 0.855", "Dice 0.015 -> 0.415"]
    # no affine stage (fields on the fixed grid already): "before" is the scan as given
    assert stage_measures(_values("instance-optimisation", raw=False)) == ["NCC 0.855 -> 0.947", "Dice 0.015 -> 0.597"]
    assert stage_measures({"engine": "network"}) == []
