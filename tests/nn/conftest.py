"""Fixtures of the shipped-model tests."""

from __future__ import annotations

import pytest

from voxreg.core import synthetic
from voxreg.io import normalize_intensity, templates


@pytest.fixture(scope="module")
def demo_pair():
    """The README demo's pair: the MNI152 2 mm template against a known smooth deformation of
    itself with an intensity change (core.synthetic, seed 0)."""
    template = templates.mni152_template(2)
    labels = templates.mni152_tissue_labels(2)
    scaled = template.with_array(normalize_intensity(template.array))
    return synthetic.make_synthetic_pair(scaled, labels, max_displacement=5.0, seed=0)
