"""The brain model that ships inside the package: present, small, licence-clean card, and the
shipped path works offline end to end.

The pair is the README demo's: the MNI152 2 mm template of the nilearn wheel against a known
smooth deformation of itself with an intensity change (core.synthetic, seed 0). The template is
also the source of the model's synthetic training data, so this checks the path, not
generalisation: real held-out subjects are in tests/test_real_data.py (skipped without
../shared) and docs/models.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import voxreg
from voxreg import metrics
from voxreg.nn import load_checkpoint
from voxreg.nn.shipped import default_model, find_shipped, shipped_models

MAX_SHIPPED_MB = 25.0


def _dice(pair, result) -> float:
    warped = result.warped_labels["tissues"].array
    return float(np.mean(list(metrics.dice_per_label(pair.fixed_labels.array, warped, [1, 2, 3]).values())))


def test_the_brain_model_ships_with_its_card():
    brain = find_shipped("brain")
    assert default_model(3) == brain and default_model(2) is None
    assert sum(model.size_mb for model in shipped_models()) <= MAX_SHIPPED_MB
    card = brain.card
    assert card["ndim"] == 3 and card["anatomy"] == "brain" and card["refine"] > 0
    assert "../shared/data" in card["licences"] and "MNI152" in card["licences"]
    assert {k: card["covers"][k] for k in ("max_spacing_mm", "max_extent_mm")} == {
        "max_spacing_mm": 4.0,
        "max_extent_mm": 300.0,
    }
    # what was measured (heads with skull as well as brain-extracted scans), in words
    assert "heads with skull" in card["covers"]["inputs_measured"]
    assert (
        card["measured"]["heads_ds000011_4pairs_brain_local_ncc_default"]
        > card["measured"]["heads_ds000011_4pairs_brain_local_ncc_affine"]
    )
    model, extra = load_checkpoint(brain.path)
    assert extra["model_space"]["voxel_size"] == pytest.approx([2.07] * 3)
    assert card["model_space"] == extra["model_space"]
    assert not model.config.lambda_conditional
    stored = torch.load(brain.path, map_location="cpu", weights_only=False)
    assert {t.dtype for t in stored["state_dict"].values() if t.is_floating_point()} == {torch.float16}


def test_the_network_alone_beats_the_affine_stage_on_the_demo_pair(demo_pair):
    labels = {"tissues": demo_pair.moving_labels}
    kwargs = dict(moving_labels=labels, metrics=False, device="cpu")
    affine = voxreg.register(demo_pair.fixed, demo_pair.moving, affine_only=True, **kwargs)
    network = voxreg.register(demo_pair.fixed, demo_pair.moving, model="brain", refine=0, **kwargs)
    assert network.metrics["engine"] == "network"
    # measured 2026-11-30 (step 6,183): affine 0.761, network 0.823
    assert _dice(demo_pair, network) > _dice(demo_pair, affine) + 0.04
    assert metrics.jacobian_stats(network.field)["folding_percent"] < 0.1
    # the network's own inverse (negated velocity, polished on the model grid) undoes the field
    # within issue 24's bounds, as the fixed-point inverse of the field does
    assert network.inverse is not None and network.inverse.shape == network.field.shape
    from voxreg.core import spatial
    from voxreg.registration.outputs import foreground_index

    index = foreground_index(demo_pair.fixed)
    own = spatial.inverse_residual(network.field, network.inverse, index).numpy()
    naive = spatial.inverse_residual(network.field, -network.field, index).numpy()
    assert own.mean() < 0.1 and np.percentile(own, 99) < 0.5 and own.mean() < naive.mean() / 2


def test_the_default_engine_is_the_model_and_its_refinement(demo_pair):
    labels = {"tissues": demo_pair.moving_labels}
    result = voxreg.register(demo_pair.fixed, demo_pair.moving, moving_labels=labels, metrics=False, device="cpu")
    refine = find_shipped("brain").card["refine"]
    assert result.metrics["engine"] == f"network+refine{refine}"
    assert result.metrics["engine_reason"] == "shipped model brain"
    # measured 2026-11-30 (step 6,183): 0.887 (instance optimisation alone: 0.891)
    assert _dice(demo_pair, result) > 0.87
