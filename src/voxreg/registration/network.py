"""Network inference in the model's space.

A checkpoint that records a :class:`~voxreg.registration.model_space.ModelSpace` (voxel
size, dimension, grid rule, intensity normalisation) predicts on a *model grid*: the fixed
scan's axes at the model's voxel size around the fixed scan's foreground. The affine-aligned
pair is resampled there (smoothed first when the model's voxels are larger), normalised,
the field is predicted and mapped back onto the fixed grid through world millimetres
(:func:`~voxreg.registration.model_space.field_to_fixed`). A checkpoint without a model
space predicts on the fixed grid itself, as networks trained on preprocessed scans expect.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voxreg import io
from voxreg.core import spatial
from voxreg.core.errors import VoxregError
from voxreg.core.grid import Grid, apply_matrix
from voxreg.core.image import Image
from voxreg.core.runtime import network_precision
from voxreg.registration.model_space import ModelSpace, field_to_fixed, model_grid

__all__ = ["model_space_of", "predict_fields", "to_model_grid"]

_FOREGROUND = 0.05  # normalised intensity above which a fixed voxel is foreground
# fixed-point steps that polish the integrated inverse on the model grid: on a 1 mm brain pair
# (Mindboggle 2 -> 1) its round-trip residual on the fixed grid went 0.095 -> 0.041 voxel
# (mean; p99 0.32 -> 0.15) in 2 steps and no further in 4 (the rest is the resampling to
# the fixed grid); inverting the 1 mm field instead gives 0.017 but costs 2 s
_INVERSE_STEPS = 2


def model_space_of(extra: Mapping[str, Any], path: str = "checkpoint") -> ModelSpace | None:
    """The model space a checkpoint records (``extra['model_space']``), or None."""
    data = extra.get("model_space")
    if data is None:
        return None
    try:
        return ModelSpace.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise VoxregError(f"{path}: invalid model space in the checkpoint ({exc})") from None


def _tensor(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _anti_aliasing(image_spacing: Sequence[float] | np.ndarray, grid: Grid) -> tuple[np.ndarray, list[int], int]:
    """(Gaussian sigma per axis in image voxels, integer block factors, margin in voxels) with
    which :func:`to_model_grid` smooths an image of ``image_spacing`` before sampling ``grid``."""
    ratio = np.asarray(grid.spacing) / np.asarray(image_spacing)
    sigma = np.where(ratio > 1.0, 0.4 * ratio, 0.0)
    factors = [int(f) for f in np.maximum(np.floor(ratio + 1e-6), 1)]
    margin = int(np.ceil(2.5 * sigma.max())) + 2 * max(factors) + 2
    return sigma, factors, margin


def to_model_grid(image: Image, grid: Grid, world_matrix: np.ndarray | None = None) -> np.ndarray:
    """``image`` resampled onto ``grid`` (linear; through ``world_matrix``, fixed world ->
    image world, when given), anti-aliased first along each axis whose voxels are finer than
    the grid's: a Gaussian of sigma 0.4 x the size ratio, made of a block average by the
    ratio's integer part and a Gaussian for the rest (8x less to smooth at 1 -> 2 mm). Only
    the part of the image the grid reaches is smoothed."""
    sigma, factors, margin = _anti_aliasing(image.spacing, grid)
    part = _reachable_part(image, grid, world_matrix, margin, align=np.asarray(factors))
    tensor = torch.from_numpy(np.ascontiguousarray(part.array, dtype=np.float32))[None, None]
    tensor, affine = spatial.block_average(tensor, part.affine, factors)
    rest = np.sqrt(np.clip(sigma**2 - spatial.box_variance(factors, np.ones_like(sigma)), 0.0, None)) / factors
    array = spatial.gaussian_blur(tensor, rest.tolist())[0, 0].numpy()
    target = Image(np.zeros(grid.shape, np.float32), grid.affine)
    return io.resample_to(Image(array, affine), target, world_matrix=world_matrix).array


def warped_to_model_grid(
    moving: Image, fixed: Grid, grid: Grid, field: Tensor, world_matrix: np.ndarray | None = None
) -> np.ndarray:
    """The moving scan as the network sees it after ``field`` (a displacement in voxels of the
    model ``grid``): resampled once through ``world_matrix`` and the field onto the part of
    the ``fixed`` grid that the model grid reaches, then anti-aliased onto the model grid as
    :func:`to_model_grid` does the first pass's input (smoothed after the warp, as in
    training, where the network saw block means of scans on the fixed side's grid)."""
    _, factors, margin = _anti_aliasing(fixed.spacing, grid)
    found = _reachable_box(fixed, grid, None, margin, align=np.asarray(factors))
    box, affine = found if found is not None else (tuple(slice(0, n) for n in fixed.shape), fixed.affine)
    target = Image(np.empty([piece.stop - piece.start for piece in box], np.float32), affine)
    on_part = field_to_fixed(field, grid, target.grid)
    warped = io.resample_to(moving, target, world_matrix, nearest=False, device=field.device, field=on_part)
    return to_model_grid(warped, grid)


def _reachable_part(
    image: Image, grid: Grid, world_matrix: np.ndarray | None, margin: int, align: np.ndarray | None = None
) -> Image:
    """The box of ``image`` that ``grid``'s voxels map into (:func:`_reachable_box`); the image
    itself when none of it is reached."""
    found = _reachable_box(image.grid, grid, world_matrix, margin, align)
    if found is None:
        return image
    box, affine = found
    return Image(image.array[box], affine, image.path, image.kind)


def _reachable_box(
    image: Grid, grid: Grid, world_matrix: np.ndarray | None, margin: int, align: np.ndarray | None = None
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """(box, its affine): the voxels of the ``image`` grid that ``grid``'s voxels map into
    (through ``world_matrix``), ``margin`` voxels wider and clipped to the image, starting at a
    multiple of ``align`` per axis (so block averages of the part and of the image share their
    blocks); None when none of the image is reached."""
    matrix = grid.voxel_matrix_to(image, world_matrix)
    corners = np.array(list(itertools.product(*[(0.0, s - 1.0) for s in grid.shape])))
    mapped = apply_matrix(matrix, corners)
    last = np.asarray(image.shape) - 1
    low = np.clip(np.floor(mapped.min(0)) - margin, 0, last).astype(int)
    if align is not None:
        low -= low % np.asarray(align)
    high = np.clip(np.ceil(mapped.max(0)) + margin, 0, last).astype(int)
    if np.any(mapped.max(0) < 0) or np.any(mapped.min(0) > last):
        return None
    shift = np.eye(4)
    shift[: image.ndim, 3] = low
    return tuple(slice(a, b + 1) for a, b in zip(low, high)), image.affine @ shift


def _foreground(image: Image) -> np.ndarray:
    """Voxels above 5 % of the robust intensity range, its percentiles taken over every
    second voxel along each axis (the same range at an eighth of the cost)."""
    array = image.array
    low, high = io.robust_range(np.asarray(array[(slice(None, None, 2),) * array.ndim], np.float32), 0.5, 99.5)
    return array > low + _FOREGROUND * (high - low)


def predict_fields(
    model: torch.nn.Module,
    space: ModelSpace | None,
    fixed: Image,
    moving: Image,
    lam: float | None,
    device: torch.device,
    world_matrix: np.ndarray | None = None,
    inverse: bool = False,
    symmetric: bool = False,
    passes: int = 1,
) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """(field, inverse): the displacement ``(1, ndim, *fixed.shape)`` in voxels of the fixed
    grid predicted by ``model`` for an affine-aligned pair (``moving`` on the fixed grid, or
    any moving scan with ``world_matrix``, fixed world -> moving world, resampled once onto
    the model grid); with ``inverse`` and a diffeomorphic voxreg network, a function giving
    its inverse on the fixed grid (``exp(-v)`` integrated on the network's own grid like the
    field and polished there now, mapped onto the fixed grid only when called); else None.
    ``symmetric``: the velocity averaged over both directions (``VoxelMorph.forward``).

    ``passes > 1`` applies the network again to the moving scan warped by the fields so far
    (resampled once from the scan, :func:`warped_to_model_grid`) and composes the fields on
    the network's grid: a cascade of one network (:func:`_cascade`)."""
    if space is None:
        fixed_n = io.normalize_intensity(fixed.array)

        def moving_on_fixed(field: Tensor | None) -> np.ndarray:
            on_fixed = io.resample_to(moving, fixed, world_matrix, device=device, field=field)  # a copy when there
            return io.normalize_intensity(on_fixed.array)

        field, backward = _cascade(model, fixed_n, moving_on_fixed, lam, device, inverse, symmetric, passes)
        if backward is not None and passes > 1:  # polished here: nothing maps it later
            backward = functools.partial(_polished_inverse, field, backward)
        return field, backward
    grid = model_grid(fixed.grid, space, foreground=_foreground(fixed))
    fixed_m = io.normalize_intensity(to_model_grid(fixed, grid))

    def moving_on_model(field: Tensor | None) -> np.ndarray:
        if field is None:
            return io.normalize_intensity(to_model_grid(moving, grid, world_matrix))
        return io.normalize_intensity(warped_to_model_grid(moving, fixed.grid, grid, field, world_matrix))

    field, backward = _cascade(model, fixed_m, moving_on_model, lam, device, inverse, symmetric, passes)
    mapped = None if backward is None else functools.partial(_inverse_on_fixed, field, backward, grid, fixed.grid)
    return field_to_fixed(field, grid, fixed.grid), mapped


def _cascade(
    model: torch.nn.Module,
    fixed: np.ndarray,
    moving_after: Callable[[Tensor | None], np.ndarray],
    lam: float | None,
    device: torch.device,
    inverse: bool,
    symmetric: bool,
    passes: int,
) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """``passes`` forward passes on the network's grid: pass k registers ``fixed`` to
    ``moving_after(field)``, the moving scan warped by the composition of passes 1..k-1 (None
    for the first pass), and its field is composed inside them (``x -> T_1(...T_k(x))``).
    The inverse, when the network gives one, is the composition of each pass's inverse in the
    reverse order (``T_k^-1 ... T_1^-1``), which :func:`_inverse_on_fixed` then polishes
    against the composed field."""
    field, backward = _forward(model, fixed, moving_after(None), lam, device, inverse, symmetric)
    backwards = [backward]
    for _ in range(passes - 1):
        step, step_backward = _forward(model, fixed, moving_after(field), lam, device, inverse, symmetric)
        with torch.no_grad():
            field = spatial.compose(field, step)
        backwards.append(step_backward)
    if passes == 1:
        return field, backward
    known = [item for item in backwards if item is not None]
    return field, functools.partial(_composed_inverse, known) if len(known) == passes else None


def _composed_inverse(backwards: Sequence[Callable[[], Tensor]]) -> Tensor:
    """``T_k^-1 o ... o T_1^-1`` for the passes' inverses ``backwards`` (pass 1 first): the
    inverse of the cascade's ``T_1 o ... o T_k``."""
    with torch.inference_mode():
        total = backwards[0]()
        for backward in backwards[1:]:
            total = spatial.compose(backward(), total)
        return total


def _inverse_on_fixed(field: Tensor, integrate_inverse: Callable[[], Tensor], grid: Grid, fixed: Grid) -> Tensor:
    """The network's inverse of ``field`` (model grid) on the fixed grid: ``integrate_inverse()``
    (its velocity negated and integrated), polished on the model grid by fixed-point steps that
    remove the integration's error there (:func:`_polished_inverse`), then mapped onto ``fixed``."""
    with torch.inference_mode():
        return field_to_fixed(_polished_inverse(field, integrate_inverse), grid, fixed)


def _polished_inverse(field: Tensor, integrate_inverse: Callable[[], Tensor]) -> Tensor:
    """``integrate_inverse()`` (the network's inverse of ``field``) after fixed-point steps
    against ``field`` that remove the integration's (and a cascade's composition) error."""
    with torch.inference_mode():
        return spatial.invert_displacement(field, _INVERSE_STEPS, initial=integrate_inverse())


def _forward(
    model: torch.nn.Module,
    fixed: np.ndarray,
    moving: np.ndarray,
    lam: float | None,
    device: torch.device,
    inverse: bool = False,
    symmetric: bool = False,
) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """One forward pass on normalised arrays: the field ``(1, ndim, *shape)`` and, when
    ``inverse`` and the network can give it (:class:`~voxreg.nn.VoxelMorph`, diffeomorphic),
    a function integrating its inverse when called (not before: most runs never ask);
    ``symmetric`` (diffeomorphic VoxelMorph only) averages both directions. A voxreg network
    runs its convs in :func:`~voxreg.core.runtime.network_precision`."""
    from voxreg.nn import VoxelMorph

    options: dict[str, Any] = {"inverse": "later"} if inverse and isinstance(model, VoxelMorph) else {}
    if symmetric:
        if not (isinstance(model, VoxelMorph) and model.config.diffeomorphic):
            raise VoxregError("symmetric inference needs a diffeomorphic voxreg network (trained with --int-steps > 0)")
        options["symmetric"] = True
    if isinstance(model, VoxelMorph) and network_precision(device) == "bfloat16":
        options["bf16"] = True
    with torch.inference_mode():
        output = model(_tensor(moving, device), _tensor(fixed, device), lam=lam, **options)
    later = getattr(output, "inverse_later", None)
    return output.field.clone(), None if later is None else functools.partial(_in_inference_mode, later)


def _in_inference_mode(make: Callable[[], Tensor]) -> Tensor:
    """``make()`` under ``torch.inference_mode`` (it reads the forward pass's inference tensors)."""
    with torch.inference_mode():
        return make()
