"""Synthetic label-map training pairs (SynthMorph recipe): shapes, labels, fields, intensities."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxreg.core.spatial import jacobian_determinant
from voxreg.io.templates import mni152_tissue_labels
from voxreg.training.synth import (
    SynthBatch,
    SynthConfig,
    SynthGenerator,
    brain_parcellation,
    gaussian_blur,
    one_hot,
    random_smooth_field,
    relabel_consecutive,
)

SHAPE_3D = (24, 28, 24)
SHAPE_2D = (40, 48)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shapes_config(**kwargs) -> SynthConfig:
    kwargs.setdefault("shape", SHAPE_3D)
    kwargs.setdefault("sources", {"shapes": 1.0})
    return SynthConfig(**kwargs)


def check_batch(batch: SynthBatch, n: int, shape: tuple[int, ...]) -> None:
    for name in ("fixed", "moving"):
        image = getattr(batch, name)
        assert image.shape == (n, 1, *shape) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    for name in ("fixed_labels", "moving_labels", "base_labels"):
        labels = getattr(batch, name)
        assert labels.shape == (n, 1, *shape) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < batch.num_labels
    for name in ("fixed_field", "moving_field"):
        assert getattr(batch, name).shape == (n, len(shape), *shape)
    assert len(batch) == n and len(batch.sources) == n


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"difficulty": 1.5}, "difficulty"),
        ({"shape": (64,)}, "shape"),
        ({"sources": {"noise": 1.0}}, "noise"),
        ({"sources": {"shapes": 0.0}}, "sources"),
        ({"max_displacement": (6.0, 2.0)}, "max_displacement"),
        ({"blur_sigma": (0.0, 9.0)}, "blur_sigma"),
        ({"num_brain_labels": 2}, "num_brain_labels"),
        ({"lowres_prob": -0.1}, "lowres_prob"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_config_round_trips_through_dict():
    config = shapes_config(difficulty=0.3, blur_sigma=[0.5, 1.0])
    assert config.blur_sigma == (0.5, 1.0)
    assert SynthConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        SynthConfig.from_dict({"bogus": 1})


# --------------------------------------------------------------------------- pairs


def test_batch_shapes_dtypes_and_label_subsets():
    generator = SynthGenerator(shapes_config(num_shape_labels=12))
    batch = generator.sample(3, gen(0))
    check_batch(batch, 3, SHAPE_3D)
    assert batch.num_labels == 12 and batch.sources == ("shapes",) * 3
    for i in range(3):
        base = set(batch.base_labels[i].unique().tolist())
        assert len(base) >= 6  # the argmax of 12 noise channels leaves most labels present
        assert set(batch.fixed_labels[i].unique().tolist()) <= base
        assert set(batch.moving_labels[i].unique().tolist()) <= base
    # the label maps are exactly the base warped (nearest) by the returned fields
    try:
        from voxreg.core import spatial
    except ImportError:  # pragma: no cover
        from voxreg import spatial  # type: ignore[attr-defined,no-redef,unused-ignore]
    again = spatial.warp(batch.base_labels, batch.fixed_field, mode="nearest")
    assert torch.equal(again, batch.fixed_labels)
    # every voxel is one label: one-hot sums to exactly 1
    assert torch.equal(one_hot(batch.fixed_labels, batch.num_labels).sum(1), torch.ones(3, *SHAPE_3D))


def test_zero_difficulty_gives_identical_label_maps_and_hard_one_does_not():
    easy = SynthGenerator(shapes_config(difficulty=0.0)).sample(2, gen(1))
    assert torch.equal(easy.fixed_labels, easy.moving_labels)
    assert torch.equal(easy.fixed_labels, easy.base_labels)
    assert float(easy.fixed_field.abs().max()) == 0.0
    assert not torch.equal(easy.fixed, easy.moving)  # intensities still differ
    hard = SynthGenerator(shapes_config(difficulty=1.0, max_displacement=(6.0, 6.0))).sample(2, gen(1))
    changed = (hard.fixed_labels != hard.moving_labels).float().mean()
    assert 0.1 < float(changed) < 0.9


def test_difficulty_scales_the_displacement():
    norms = []
    for difficulty in (0.5, 1.0):
        batch = SynthGenerator(shapes_config(difficulty=difficulty, max_displacement=(4.0, 4.0))).sample(2, gen(5))
        norms.append(batch.fixed_field.norm(dim=1).flatten(1).amax(1))
    assert torch.allclose(norms[1], torch.full((2,), 4.0), rtol=0.35)
    assert torch.allclose(norms[0] / norms[1], torch.full((2,), 0.5), atol=0.08)


def test_random_fields_are_diffeomorphic_and_sized():
    fields = random_smooth_field(3, (32, 40, 32), [2.0, 6.0, 10.0], [8.0, 12.0, 20.0], gen(2))
    assert fields.shape == (3, 3, 32, 40, 32) and fields.dtype == torch.float32
    max_norm = fields.norm(dim=1).flatten(1).amax(1)
    assert torch.allclose(max_norm, torch.tensor([2.0, 6.0, 10.0]), rtol=0.35)
    det = jacobian_determinant(fields)
    assert float((det > 0).float().mean()) >= 0.999
    assert float(det.min()) > -0.5
    field2d = random_smooth_field(2, SHAPE_2D, 8.0, 10.0, gen(2))
    assert float((jacobian_determinant(field2d) > 0).float().mean()) >= 0.999
    assert torch.equal(random_smooth_field(2, SHAPE_2D, 0.0, 10.0, gen(2)), torch.zeros(2, 2, *SHAPE_2D))


def test_intensities_span_zero_to_one_and_differ_between_fixed_and_moving():
    batch = SynthGenerator(shapes_config()).sample(2, gen(3))
    for image in (batch.fixed, batch.moving):
        flat = image.flatten(1)
        assert torch.allclose(flat.amin(1), torch.zeros(2), atol=1e-6)
        assert torch.allclose(flat.amax(1), torch.ones(2), atol=1e-6)
        assert bool((flat.std(1) > 0.05).all())
    assert float((batch.fixed - batch.moving).abs().mean()) > 0.05


def test_plain_mixture_is_constant_per_label_and_background_dark():
    config = shapes_config(
        std_range=(0.0, 0.0),
        blur_sigma=(0.0, 0.0),
        bias_strength=0.0,
        noise_std=0.0,
        gamma_std=0.0,
        lowres_prob=0.0,
        dark_background_prob=1.0,
        num_shape_labels=8,
    )
    batch = SynthGenerator(config).sample(2, gen(4))
    for image, labels in ((batch.fixed, batch.fixed_labels), (batch.moving, batch.moving_labels)):
        for i in range(2):
            assert bool((image[i][labels[i] == 0] == 0).all())  # dark background
            for k in labels[i].unique().tolist():
                values = image[i][labels[i] == k]
                assert float(values.max() - values.min()) < 1e-6


def test_same_generator_seed_gives_identical_batches_and_other_seed_differs():
    generator = SynthGenerator(shapes_config())
    a, b, c = generator.sample(2, gen(7)), generator.sample(2, gen(7)), generator.sample(2, gen(8))
    for name in ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_field"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.fixed_labels, c.fixed_labels)
    assert not torch.equal(a.fixed, c.fixed)
    # the internal generator (seeded with config.seed) advances: consecutive batches differ
    first, second = generator.sample(1), generator.sample(1)
    assert not torch.equal(first.fixed, second.fixed)
    assert torch.equal(SynthGenerator(shapes_config()).sample(1).fixed, first.fixed)


def test_two_dimensional_pairs():
    batch = SynthGenerator(shapes_config(shape=SHAPE_2D)).sample(2, gen(9))
    check_batch(batch, 2, SHAPE_2D)
    assert float((batch.fixed_labels != batch.moving_labels).float().mean()) > 0.05


def test_gaussian_blur_matches_scipy_per_sample():
    x = torch.rand(2, 1, 12, 14, 10, generator=gen(10))
    y = gaussian_blur(x, torch.tensor([1.2, 0.0]))
    ref = ndimage.gaussian_filter(x[0, 0].numpy(), 1.2, mode="nearest", truncate=2.5)
    assert np.abs(y[0, 0].numpy() - ref).max() < 1e-5
    assert torch.equal(y[1], x[1])


def test_one_hot_values_and_range_check():
    labels = torch.tensor([[[0, 2], [1, 2]]]).unsqueeze(1)
    encoded = one_hot(labels, 3)
    assert encoded.shape == (1, 3, 2, 2) and encoded.dtype == torch.float32
    assert encoded[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="num_labels|\\[0, 2\\)"):
        one_hot(labels, 2)


# --------------------------------------------------------------------------- user label maps


def test_user_label_maps_with_arbitrary_codes_are_relabelled_consecutively():
    big = 2**31 - 1
    first = np.zeros((20, 24), np.int64)
    first[4:12, 4:14], first[12:18, 6:20] = 17, big
    second = np.full((30, 36), 17, np.int64)  # another size: resampled to the working shape
    second[:10] = 0
    codes_first, _ = relabel_consecutive(first)
    assert sorted(codes_first.unique().tolist()) == [0, 1, 2]
    assert int(codes_first[5, 5]) == 1 and int(codes_first[13, 10]) == 2
    config = SynthConfig(shape=SHAPE_2D, sources={"user": 1.0})
    generator = SynthGenerator(config, label_maps=[first, second])
    assert generator.user_codes is not None
    assert generator.user_codes.tolist() == [0, 17, big] and generator.num_labels == 3
    batch = generator.sample(4, gen(11))
    check_batch(batch, 4, SHAPE_2D)
    assert set(batch.base_labels.unique().tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="integer"):
        SynthGenerator(config, label_maps=[first.astype(np.float32)])
    with pytest.raises(ValueError, match="label_maps"):
        SynthGenerator(config)


def test_sources_are_mixed_with_the_given_weights():
    first = np.zeros((8, 8), np.int64)
    first[2:6, 2:6] = 5
    config = SynthConfig(shape=(8, 8), sources={"shapes": 1.0, "user": 3.0}, num_shape_labels=4)
    generator = SynthGenerator(config, label_maps=[first])
    batch = generator.sample(200, gen(12))
    share = batch.sources.count("user") / 200
    assert 0.65 < share < 0.85
    assert generator.num_labels == 4
    user = [i for i, s in enumerate(batch.sources) if s == "user"]
    assert set(batch.base_labels[user].unique().tolist()) == {0, 1}


# --------------------------------------------------------------------------- brain


def test_brain_parcellation_has_the_requested_labels_each_inside_one_tissue():
    parcels, tissue_of = brain_parcellation(24, seed=0)
    tissue = np.asarray(mni152_tissue_labels(2).array)
    assert parcels.shape == tissue.shape == (99, 117, 95)
    assert np.unique(parcels).tolist() == list(range(24)) and tissue_of.shape == (24,)
    assert np.array_equal(tissue_of[parcels], tissue)  # every parcel inside its one tissue
    assert sorted(set(tissue_of[1:].tolist())) == [1, 2, 3] and tissue_of[0] == 0
    sizes = np.bincount(parcels.ravel())[1:]
    assert sizes.min() > 50  # k-means, not a few stray voxels
    again, _ = brain_parcellation(24, seed=0)
    other, _ = brain_parcellation(24, seed=1)
    assert np.array_equal(again, parcels) and not np.array_equal(other, parcels)


def test_brain_source_in_3d_and_2d():
    config = SynthConfig(shape=(32, 40, 32), sources={"brain": 1.0}, num_brain_labels=20)
    batch = SynthGenerator(config).sample(2, gen(13))
    check_batch(batch, 2, (32, 40, 32))
    assert batch.num_labels == 20
    for i in range(2):
        present = batch.base_labels[i].unique()
        assert present.numel() >= 15  # the whole brain is in view
        brain_fraction = float((batch.base_labels[i] > 0).float().mean())
        assert 0.2 < brain_fraction < 0.8
    assert not torch.equal(batch.base_labels[0], batch.base_labels[1])  # new anatomy per sample
    flat = SynthGenerator(SynthConfig(shape=SHAPE_2D, sources={"brain": 1.0, "shapes": 1.0})).sample(3, gen(14))
    check_batch(flat, 3, SHAPE_2D)
    assert flat.num_labels == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_layout():  # pragma: no cover - GPU only
    generator = SynthGenerator(shapes_config(), device="cuda")
    batch = generator.sample(2, torch.Generator(device="cuda").manual_seed(0))
    assert batch.fixed.is_cuda and batch.fixed_labels.is_cuda
    on_cpu: dict[str, Any] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
    check_batch(SynthBatch(**on_cpu), 2, SHAPE_3D)


def test_field_and_shape_helpers_validate_their_arguments():
    with pytest.raises(ValueError, match="shape"):
        random_smooth_field(1, (64,), 4.0, 10.0, gen(0))
    with pytest.raises(ValueError, match="max_displacement"):
        random_smooth_field(2, SHAPE_2D, [1.0, 2.0, 3.0], 10.0, gen(0))
    with pytest.raises(ValueError, match="batch_size"):
        SynthGenerator(shapes_config(shape=SHAPE_2D)).sample(0, gen(0))


# --------------------------------------------------------------------------- T1 images

NO_AUGMENTATION = dict(blur_sigma=(0.0, 0.0), bias_strength=0.0, noise_std=0.0, gamma_std=0.0, lowres_prob=0.0)


def t1_config(**kwargs) -> SynthConfig:
    kwargs.setdefault("shape", (32, 40, 32))
    kwargs.setdefault("sources", {"brain": 1.0})
    kwargs.setdefault("t1_prob", 1.0)
    return SynthConfig(**kwargs)


def min_max(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    return (x - lo.view(-1, *[1] * (x.dim() - 1))) / (hi - lo).view(-1, *[1] * (x.dim() - 1))


def test_t1_images_at_zero_difficulty_are_the_fitted_template():
    from voxreg.training.synth import _brain_on_grid, _t1_on_grid

    config = t1_config(difficulty=0.0, anatomy_displacement=(0.0, 0.0), scale_range=0.0, **NO_AUGMENTATION)
    batch = SynthGenerator(config).sample(2, gen(20))
    check_batch(batch, 2, config.shape)
    assert batch.t1 == (True, True) and batch.base_images is not None
    assert torch.equal(batch.fixed, batch.moving)
    template = _t1_on_grid(config.shape)
    assert torch.allclose(batch.fixed, min_max(template).expand(2, -1, -1, -1, -1), atol=1e-5)
    # the T1 sits on the parcellation: background dark, and CSF < GM < WM on average
    parcels = _brain_on_grid(config.shape, config.num_brain_labels, config.seed)
    assert torch.equal(batch.base_labels, parcels.expand(2, -1, -1, -1, -1))
    tissue_of = torch.from_numpy(brain_parcellation(config.num_brain_labels, config.seed)[1].astype(np.int64))
    tissue = tissue_of[parcels]
    means = [float(template[tissue == t].mean()) for t in range(4)]
    assert means[0] < 0.05 and means[1] < means[2] < means[3]


def test_t1_images_are_the_anatomy_warped_by_the_returned_fields():
    try:
        from voxreg.core import spatial
    except ImportError:  # pragma: no cover
        from voxreg import spatial  # type: ignore[attr-defined,no-redef,unused-ignore]
    config = t1_config(difficulty=1.0, max_displacement=(4.0, 6.0), **NO_AUGMENTATION)
    batch = SynthGenerator(config).sample(2, gen(21))
    tissue_of = torch.from_numpy(brain_parcellation(config.num_brain_labels, config.seed)[1].astype(np.int64))
    check_batch(batch, 2, config.shape)
    assert batch.base_images is not None
    assert float((batch.fixed - batch.moving).abs().mean()) > 0.01
    for image, labels, field_ in (
        (batch.fixed, batch.fixed_labels, batch.fixed_field),
        (batch.moving, batch.moving_labels, batch.moving_field),
    ):
        assert torch.equal(labels, spatial.warp(batch.base_labels, field_, mode="nearest"))
        expected = min_max(spatial.warp(batch.base_images, field_, mode="linear"))
        assert torch.allclose(image, expected, atol=1e-5)
        # the texture follows the labels: background dark, CSF < GM < WM on average
        tissue = tissue_of[labels]
        means = [float(image[tissue == t].mean()) for t in range(4)]
        assert means[0] < 0.05 and means[1] < means[2] < means[3]


def test_augmented_t1_images_correlate_with_the_warped_template_inside_the_brain():
    try:
        from voxreg.core import spatial
    except ImportError:  # pragma: no cover
        from voxreg import spatial  # type: ignore[attr-defined,no-redef,unused-ignore]
    batch = SynthGenerator(t1_config()).sample(6, gen(24))  # default augmentation
    assert batch.base_images is not None
    own, swapped = [], []
    for image, labels, field_, other in (
        (batch.fixed, batch.fixed_labels, batch.fixed_field, batch.moving_field),
        (batch.moving, batch.moving_labels, batch.moving_field, batch.fixed_field),
    ):
        right, wrong = spatial.warp(batch.base_images, field_), spatial.warp(batch.base_images, other)
        for i in range(6):
            inside = labels[i] > 0
            own.append(np.corrcoef(image[i][inside].numpy(), right[i][inside].numpy())[0, 1])
            swapped.append(np.corrcoef(image[i][inside].numpy(), wrong[i][inside].numpy())[0, 1])
    assert min(own) > 0.8
    assert np.mean(own) > np.mean(swapped) + 0.15  # the other image's field does not explain it


def test_t1_pairs_mix_with_mixture_pairs_and_are_reproducible():
    config = SynthConfig(shape=SHAPE_2D, sources={"brain": 1.0, "shapes": 1.0}, t1_prob=0.5, same_contrast=1.0)
    generator = SynthGenerator(config)
    a, b = generator.sample(12, gen(22)), generator.sample(12, gen(22))
    check_batch(a, 12, SHAPE_2D)
    for name in ("fixed", "moving", "fixed_labels", "moving_labels", "base_images"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.t1 == b.t1 and any(a.t1) and not all(a.t1)
    assert all(source == "brain" for source, t1 in zip(a.sources, a.t1) if t1)
    assert a.base_images is not None
    for i, t1 in enumerate(a.t1):  # the T1 anatomy is zero outside T1 pairs, and dark off-brain
        assert (float(a.base_images[i].abs().max()) > 0.5) == t1
        if t1:
            assert float(a.base_images[i][a.base_labels[i] == 0].mean()) < 0.05
    # t1_prob = 0 draws nothing extra: the mixture path is unchanged
    plain = SynthGenerator(SynthConfig(shape=SHAPE_2D, sources={"brain": 1.0}, same_contrast=1.0))
    zero = SynthGenerator(SynthConfig(shape=SHAPE_2D, sources={"brain": 1.0}, same_contrast=1.0, t1_prob=0.0))
    p, z = plain.sample(2, gen(23)), zero.sample(2, gen(23))
    assert torch.equal(p.fixed, z.fixed) and z.base_images is None and z.t1 == (False, False)


def test_synth_config_of_uses_t1_pairs_with_an_image_similarity():
    from voxreg.training.config import TrainConfig
    from voxreg.training.synth_data import synth_config_of

    with_ncc = synth_config_of(TrainConfig(synth="brain:1", similarity_weight=1.0))
    dice_only = synth_config_of(TrainConfig(synth="brain:1", similarity_weight=0.0, dice_weight=1.0))
    assert (with_ncc.t1_prob, with_ncc.same_contrast, with_ncc.tissue_contrast) == (0.5, 1.0, 0.5)
    assert (dice_only.t1_prob, dice_only.same_contrast) == (0.0, 0.0)


def test_mni152_brain_mask_matches_the_template_brain():
    """The brain mask: a brain's volume (1.2-2.0 litres), the template's bright voxels at
    2 mm inside it, and the same mask at 1 and 2 mm within a few percent."""
    import numpy as np

    from voxreg.io import templates

    two, one = templates.mni152_brain_mask(2), templates.mni152_brain_mask(1)
    litres = [float(m.array.sum()) * float(np.prod(m.spacing)) / 1e6 for m in (two, one)]
    assert 1.2 < litres[0] < 2.0 and abs(litres[0] - litres[1]) / litres[1] < 0.03
    t1 = templates.mni152_template(2).array
    assert two.kind == "label" and two.shape == t1.shape
    outside = float(((t1 > 0.2 * t1.max()) & (two.array == 0)).sum()) / float(two.array.sum())
    assert outside < 0.01  # only partial-volume voxels at the brain's edge
