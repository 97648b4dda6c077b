"""Simulated multi-phase liver CT: register contrast phases with NCC and with MI.

voxreg's seed use case is aligning the contrast phases of a liver CT (arterial, portal
venous, delayed), where the same tissue has different Hounsfield units (HU) in each phase.
No real multi-phase pair is available, so this script builds one from the TotalSegmentator
example (``../shared/data/ct/totalsegmentator_example``: an unenhanced abdominal CT crop,
122x101x30 at 3 mm, and its 41-organ label map; research data, read in place, never copied
into the repository):

1. **Phases.** For each organ of :data:`PHASE_HU` the voxels are set to
   ``phase_HU + (original - original organ median) * texture`` (the organ's own texture,
   partial-volume edges included, is kept; other tissues are unchanged). Kidneys are split
   into cortex (outer ``--cortex-mm``) and medulla so that the arterial (corticomedullary)
   phase shows the cortex brighter than the medulla; the arterial spleen gets a smooth
   heterogeneous ("arciform") pattern. Gaussian noise (``--noise`` HU, seeded) is added to
   every phase after any deformation (acquisition noise is not deformed).
2. **Breathing.** The moving phases are warped by a smooth breathing-like deformation: organs
   shifted cranially by up to ``--si-mm`` at the top of the volume (liver dome), decreasing
   linearly to ~30 % of that at the bottom, weighted towards the abdominal viscera (the spine
   and back muscles move less), plus ``--ap-mm`` along anterior-posterior and a small smooth
   random component (``--random-mm``). The S-I and A-P array axes are found from the affine
   (``nibabel.aff2axcodes``). Image: linear interpolation; labels: nearest neighbour.
3. **Pairs.** fixed = portal venous (undeformed); moving = arterial (deformed, seed 1) and
   moving = delayed (another deformation, seed 2); a same-phase control (portal venous,
   deformed like the arterial phase, fresh noise) separates the intensity change from the
   deformation; ``--native`` adds native (unenhanced, the original scan, a third breath-hold)
   -> portal venous, the hardest case for NCC (vessels iso-dense to liver in one, bright in
   the other). Volumes are written to ``--out`` as NIfTI (int16 HU, original affine) with
   ``pairs.csv`` (``fixed,moving,fixed_labels,moving_labels``, absolute paths), so
   ``voxreg register`` can also be run on them by hand.
4. **Registration** with :func:`voxreg.api.register` (default settings): affine only,
   affine + NCC and affine + MI instance optimisation, with one or both intensity handlings
   (``--modes``): ``percentile`` (default; raw HU, the API's 0.5-99.5 percentile scaling,
   what ``voxreg register`` does) and ``window`` (HU clipped to ``--window`` before the call; the API has no window
   argument, so the clipped image is passed in and the original HU moving scan is then
   resampled through the returned transform).
5. **Evaluation** (all runs alike, :mod:`voxreg.metrics`): Dice of liver, spleen, left and
   right kidney (and their mean) between the fixed label map and the warped moving one;
   MI and local NCC (window 9) fixed vs moving (before) and fixed vs warped (after), both
   computed on HU scaled by the same ``--window``; % folding (Jacobian <= 0) of the
   deformable field; seconds of the whole ``register`` call. A markdown table is printed,
   ``results.json`` and ``figure.png`` (coronal slices with liver contours) are written.

Usage::

    .venv/bin/python benchmarks/multiphase_ct.py [--data ../shared/data] [--out /tmp/multiphase_ct]
        [--si-mm 10] [--ap-mm 3] [--random-mm 3] [--noise 12] [--window -200 300]
        [--modes percentile window] [--methods affine ncc mi] [--native] [--no-control] [--device cpu]

Each registration takes ~5 s (affine) or ~30-130 s (NCC/MI) on 2 CPU cores shared with other
jobs: the defaults (3 pairs x 3 methods, percentile) take ~5-10 min; the full run
``--modes percentile window --native`` (24 registrations) took 22 min on a busy machine.

Field of view: the crop is only 30 slices (90 mm) and the liver fills it from top to bottom,
so the cranial shift pushes the top of the fixed liver out of the moving scan's field of
view: that part cannot be recovered by any method (``api.register`` fills voxels outside the
moving scan with its minimum, i.e. air for CT in HU).

Phase model (:data:`PHASE_HU`, mean HU). Approximate literature values, not measurements:
typical attenuations described for multiphasic contrast-enhanced abdominal/liver CT
(~1.5 mL/kg iodinated contrast at 3-5 mL/s) in radiology reviews of contrast timing (e.g. Bae,
Radiology 2010, on aortic and hepatic enhancement curves), in multiphasic liver CT technique
guidance (LI-RADS: late arterial phase = hepatic artery fully and portal vein partly
enhanced; portal venous phase = peak liver parenchymal enhancement; delayed phase 3-5 min)
and in descriptions of renal enhancement phases (corticomedullary ~25-40 s, nephrographic
~80-120 s, excretory >3 min; e.g. Yuh & Cohan, AJR 1999) and of heterogeneous ("arciform")
splenic enhancement in the arterial phase. Native values are those of this unenhanced scan
(organ medians of ``example_ct_sm``)::

    organ                        native   late arterial   portal venous   delayed
                                 (scan)   (~35 s)         (~70 s)         (~3-5 min)
    aorta                          43        320             165             115
    portal + splenic vein          38        150             190             110
    inferior vena cava             39         90 (mixing)    150             110
    liver                          46         75             115              85
    spleen                         35        125 (heterog.)  120              90
    kidney cortex                  ~14       190             180             140
    kidney medulla                 ~14        90             165             150 (excretion)

Everything else (fat, muscle, bone, bowel, lung, pancreas, ...) keeps its original HU.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from voxreg import io, metrics
from voxreg.core import spatial
from voxreg.core.image import Image
from voxreg.core.synthetic import smooth_random_field
from voxreg.registration import pipeline as api

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASET = Path("ct") / "totalsegmentator_example"
CT_FILE, SEG_FILE, LABELS_FILE = "example_ct_sm.nii.gz", "example_seg.nii.gz", "labels.csv"

# Mean HU per organ and phase (see the module docstring for sources). "kidney" holds
# (cortex, medulla). Organ names are TotalSegmentator v2 "total" class names.
PHASE_HU: dict[str, dict[str, Any]] = {
    "arterial": {
        "aorta": 320.0,
        "portal_vein_and_splenic_vein": 150.0,
        "inferior_vena_cava": 90.0,
        "liver": 75.0,
        "spleen": 125.0,
        "kidney": (190.0, 90.0),
    },
    "portal_venous": {
        "aorta": 165.0,
        "portal_vein_and_splenic_vein": 190.0,
        "inferior_vena_cava": 150.0,
        "liver": 115.0,
        "spleen": 120.0,
        "kidney": (180.0, 165.0),
    },
    "native": {},  # the original unenhanced scan
    "delayed": {
        "aorta": 115.0,
        "portal_vein_and_splenic_vein": 110.0,
        "inferior_vena_cava": 110.0,
        "liver": 85.0,
        "spleen": 90.0,
        "kidney": (140.0, 150.0),
    },
}
# Amplitude (HU) of the smooth heterogeneous enhancement pattern added inside an organ.
HETEROGENEITY_HU = {"arterial": {"spleen": 35.0}}
KIDNEYS = ("kidney_left", "kidney_right")
# Labels scored by Dice (name -> shown as).
DICE_ORGANS = {"liver": "liver", "spleen": "spleen", "kidney_left": "kidney L", "kidney_right": "kidney R"}
# Organs whose smoothed mask weights the breathing motion (abdominal viscera).
VISCERA = (
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "stomach",
    "gallbladder",
    "pancreas",
    "colon",
    "duodenum",
    "small_bowel",
    "portal_vein_and_splenic_vein",
    "inferior_vena_cava",
)


# --------------------------------------------------------------------------- data


def find_dataset(data: Path) -> Path:
    """The example folder from ``--data`` (the shared/data root or the folder itself)."""
    for folder in (data, data / DATASET):
        if (folder / CT_FILE).is_file() and (folder / SEG_FILE).is_file() and (folder / LABELS_FILE).is_file():
            return folder
    raise SystemExit(
        f"data not found: expected {data / DATASET / CT_FILE} (+ {SEG_FILE}, {LABELS_FILE}); "
        "pass --data PATH to the shared data folder or to totalsegmentator_example"
    )


def read_label_codes(path: Path) -> dict[str, int]:
    """TotalSegmentator class name -> integer code, from labels.csv (value,name,...)."""
    with path.open(newline="") as handle:
        return {row["name"].strip(): int(row["value"]) for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------- phases


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def kidney_cortex_mask(mask: np.ndarray, spacing: Sequence[float], cortex_mm: float) -> np.ndarray:
    """Voxels of ``mask`` within ``cortex_mm`` of its boundary (renal cortex)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return mask & (depth <= cortex_mm)


def smooth_pattern(shape: Sequence[int], sigma_vox: float, seed: int) -> np.ndarray:
    """Smooth random pattern in [-1, 1] (Gaussian-smoothed white noise)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma_vox)
    return (noise / max(np.abs(noise).max(), 1e-12)).astype(np.float32)


def simulate_phase(
    ct: np.ndarray,
    seg: np.ndarray,
    codes: Mapping[str, int],
    phase_hu: Mapping[str, Any],
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    texture: float = 1.0,
    cortex_mm: float = 6.0,
    heterogeneity: Mapping[str, float] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """One contrast phase of an unenhanced CT (no noise; float32 HU).

    Each organ ``name`` of ``phase_hu`` present in ``seg`` (codes from ``codes``) gets
    ``phase_hu[name] + (ct - median of ct in the organ) * texture``; ``"kidney"`` is a
    ``(cortex, medulla)`` pair applied to ``kidney_left`` and ``kidney_right``, the cortex
    being the outer ``cortex_mm`` of each kidney (the median is the whole kidney's).
    ``heterogeneity`` adds ``amplitude * smooth pattern`` (HU) inside the named organs.
    Voxels of other labels and background are returned unchanged.
    """
    ct = np.asarray(ct, dtype=np.float32)
    out = ct.copy()
    heterogeneity = heterogeneity or {}
    for name, value in phase_hu.items():
        organs = KIDNEYS if name == "kidney" else (name,)
        for organ in organs:
            if organ not in codes:
                continue
            mask = seg == codes[organ]
            if not mask.any():
                continue
            residual = (ct[mask] - np.median(ct[mask])) * np.float32(texture)
            if name == "kidney":
                cortex_hu, medulla_hu = value
                target = np.where(kidney_cortex_mask(mask, spacing, cortex_mm), cortex_hu, medulla_hu)[mask]
            else:
                target = np.float32(value)
            out[mask] = target + residual
            amplitude = heterogeneity.get(name, 0.0)
            if amplitude:
                pattern = smooth_pattern(ct.shape, 1.5, seed + codes[organ])
                out[mask] += np.float32(amplitude) * pattern[mask]
    return out


def add_noise(array: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian noise of ``sigma`` HU (seeded)."""
    rng = np.random.default_rng(seed)
    return (array + rng.normal(0.0, sigma, array.shape)).astype(np.float32)


# --------------------------------------------------------------------------- breathing


def anatomical_axes(affine: np.ndarray) -> dict[str, tuple[int, int]]:
    """``{'SI': (axis, sign), 'AP': (axis, sign), 'LR': (axis, sign)}``: the array axis of each
    anatomical direction and +1 when the index increases towards S / A / R, else -1."""
    codes = nib.aff2axcodes(affine)
    out = {}
    for key, (positive, negative) in {"SI": ("S", "I"), "AP": ("A", "P"), "LR": ("R", "L")}.items():
        for axis, code in enumerate(codes):
            if code in (positive, negative):
                out[key] = (axis, 1 if code == positive else -1)
    return out


def breathing_field(
    shape: Sequence[int],
    affine: np.ndarray,
    weight: np.ndarray | None = None,
    si_mm: float = 10.0,
    ap_mm: float = 3.0,
    random_mm: float = 3.0,
    floor: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """A smooth breathing-like displacement ``(1, 3, *shape)`` in voxels (voxreg layout).

    Used as ``moving = warp(fixed, field)`` (``moving(x) = fixed(x + u(x))``) it shifts the
    anatomy cranially by ``si_mm`` at the most superior slice, decreasing linearly to
    ``floor * si_mm`` at the most inferior one, and posteriorly by ``ap_mm`` with the same
    profile (an expiration relative to the fixed scan). ``weight`` (in [0, 1], e.g. a
    smoothed mask of the viscera) scales the motion in-plane between 0.35 (weight 0) and 1;
    the result is rescaled so that the largest S-I displacement is exactly ``si_mm``. A
    smooth random field of max norm ``random_mm`` (:func:`voxreg.synthetic.smooth_random_field`)
    is added.
    """
    shape = tuple(int(s) for s in shape)
    axes = anatomical_axes(affine)
    spacing = voxel_sizes(affine)
    si_axis, si_sign = axes["SI"]
    ap_axis, ap_sign = axes["AP"]
    n = shape[si_axis]
    height = np.linspace(0.0, 1.0, n) if si_sign > 0 else np.linspace(1.0, 0.0, n)  # 1 = most superior
    profile = (floor + (1.0 - floor) * height).reshape([n if d == si_axis else 1 for d in range(3)])
    in_plane = np.ones(shape) if weight is None else 0.35 + 0.65 * np.clip(weight, 0.0, 1.0)
    magnitude = profile * in_plane
    magnitude = magnitude / max(float(magnitude.max()), 1e-12)
    field = np.zeros((3, *shape), dtype=np.float32)
    # anatomy moves cranially <=> the moving image samples the fixed one caudally (towards I)
    field[si_axis] = -si_sign * (si_mm / spacing[si_axis]) * magnitude
    # anatomy moves posteriorly <=> samples anteriorly (towards A)
    field[ap_axis] = ap_sign * (ap_mm / spacing[ap_axis]) * magnitude
    tensor = torch.from_numpy(field)[None]
    if random_mm > 0:
        tensor = tensor + smooth_random_field(shape, random_mm / float(spacing.min()), smoothness=12.0, seed=seed)
    return tensor.contiguous()


def warp_array(array: np.ndarray, field: torch.Tensor, nearest: bool = False) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = spatial.warp(tensor, field, mode="nearest" if nearest else "linear")[0, 0].numpy()
    return out


# --------------------------------------------------------------------------- dataset


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype: Any) -> Path:
    image = nib.Nifti1Image(np.rint(array).astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path


def build_dataset(folder: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Simulate the phases, deform the moving ones, write NIfTI files and pairs.csv."""
    ct_img, seg_img = nib.load(str(folder / CT_FILE)), nib.load(str(folder / SEG_FILE))
    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    seg = np.asarray(seg_img.dataobj).astype(np.int16)
    affine = ct_img.affine
    if seg.shape != ct.shape or not np.allclose(seg_img.affine, affine, atol=1e-3):
        raise SystemExit(f"{folder}: {SEG_FILE} is not on the grid of {CT_FILE}")
    codes = read_label_codes(folder / LABELS_FILE)
    missing = [
        n
        for n in ("aorta", "portal_vein_and_splenic_vein", "liver", "spleen", *KIDNEYS)
        if n not in codes or not (seg == codes[n]).any()
    ]
    if missing:
        raise SystemExit(f"{folder}: organs missing from the label map: {', '.join(missing)}")
    spacing = voxel_sizes(affine)
    viscera = np.isin(seg, [codes[n] for n in VISCERA if n in codes]).astype(np.float32)
    weight = ndimage.gaussian_filter(viscera, 15.0 / spacing)  # ~15 mm smoothing
    weight /= max(float(weight.max()), 1e-12)

    phases = {
        name: simulate_phase(
            ct, seg, codes, hu, spacing, args.texture, args.cortex_mm, HETEROGENEITY_HU.get(name), seed=args.seed
        )
        for name, hu in PHASE_HU.items()
    }
    # (name, phase, deformation seed or None, noise seed)
    volumes = [
        ("portal_venous", "portal_venous", None, args.seed + 10),
        ("arterial", "arterial", args.seed + 1, args.seed + 11),
        ("delayed", "delayed", args.seed + 2, args.seed + 12),
    ]
    if args.control:
        volumes.append(("portal_venous_control", "portal_venous", args.seed + 1, args.seed + 13))
    if args.native:
        volumes.append(("native", "native", args.seed + 3, args.seed + 14))
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    deformations: dict[str, Any] = {}
    for name, phase, deform_seed, noise_seed in volumes:
        image, labels = phases[phase], seg
        if deform_seed is not None:
            scale = 1.0 if phase != "delayed" else 0.8  # another breath-hold, a bit less deep
            field = breathing_field(
                ct.shape, affine, weight, args.si_mm * scale, args.ap_mm * scale, args.random_mm, seed=deform_seed
            )
            image, labels = warp_array(image, field), warp_array(seg, field, nearest=True)
            mm = field[0].numpy() * spacing.reshape(3, 1, 1, 1)
            stats = metrics.jacobian_stats(field)
            deformations[name] = {
                "max_mm": float(np.linalg.norm(mm, axis=0).max()),
                "mean_mm_in_liver": float(np.linalg.norm(mm, axis=0)[seg == codes["liver"]].mean()),
                "folding_percent": stats["folding_percent"],
                "jacobian_min": stats["jacobian_min"],
                "jacobian_max": stats["jacobian_max"],
            }
        image = add_noise(image, args.noise, noise_seed)
        files[name] = {
            "image": save_nifti(out / f"{name}.nii.gz", image, affine, np.int16),
            "labels": save_nifti(out / f"{name}_labels.nii.gz", labels, affine, np.int16),
        }
    pairs = [("arterial", "portal_venous"), ("delayed", "portal_venous")]
    if args.native:
        pairs.append(("native", "portal_venous"))
    if args.control:
        pairs.append(("portal_venous_control", "portal_venous"))
    with (out / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for moving, fixed in pairs:
            writer.writerow(
                [
                    files[fixed]["image"].resolve(),
                    files[moving]["image"].resolve(),
                    files[fixed]["labels"].resolve(),
                    files[moving]["labels"].resolve(),
                ]
            )
    organ_hu = {
        phase: {
            organ: float(np.median(phases[phase][seg == codes[organ]]))
            for organ in ("aorta", "portal_vein_and_splenic_vein", "liver", "spleen", *KIDNEYS)
        }
        for phase in phases
    }
    return {
        "files": files,
        "pairs": pairs,
        "codes": codes,
        "deformations": deformations,
        "organ_median_hu": organ_hu,
        "affine": affine,
    }


# --------------------------------------------------------------------------- registration


def windowed(image: Image, window: Sequence[float]) -> Image:
    return image.with_array(np.clip(image.array, window[0], window[1]).astype(np.float32))


def evaluate(
    fixed: Image,
    fixed_labels: np.ndarray,
    moving: Image,
    warped: np.ndarray,
    warped_labels: np.ndarray,
    moving_labels: np.ndarray,
    field: torch.Tensor,
    dice_codes: Mapping[str, int],
    window: Sequence[float],
) -> dict[str, Any]:
    """Dice per organ before/after, MI and local NCC before/after on window-scaled HU, folding."""
    scale = lambda a: io.normalize_intensity(a, window=tuple(window))  # noqa: E731
    f, m, w = scale(fixed.array), scale(moving.array), scale(warped)
    before, after = metrics.similarities(f, m), metrics.similarities(f, w)
    codes = list(dice_codes.values())
    dice_before = metrics.dice_per_label(fixed_labels, moving_labels, codes)
    dice_after = metrics.dice_per_label(fixed_labels, warped_labels, codes)
    names = list(dice_codes)
    return {
        "dice_before": {n: dice_before[c] for n, c in dice_codes.items()},
        "dice_after": {n: dice_after[c] for n, c in dice_codes.items()},
        "dice_mean_before": float(np.mean([dice_before[dice_codes[n]] for n in names])),
        "dice_mean_after": float(np.mean([dice_after[dice_codes[n]] for n in names])),
        "mi_before": before["mi"],
        "mi_after": after["mi"],
        "local_ncc_before": before["local_ncc"],
        "local_ncc_after": after["local_ncc"],
        "ncc_before": before["ncc"],
        "ncc_after": after["ncc"],
        **metrics.jacobian_stats(field),
    }


def run_method(
    pair: tuple[str, str], method: str, mode: str, data: Mapping[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One registration; returns the evaluation row, the warped HU image and warped labels."""
    moving_name, fixed_name = pair
    files = data["files"]
    fixed_img = io.load_image(files[fixed_name]["image"])
    moving_img = io.load_image(files[moving_name]["image"])
    fixed_labels = io.load_image(files[fixed_name]["labels"], label=True)
    moving_labels = io.load_image(files[moving_name]["labels"], label=True)
    fixed_in, moving_in = (
        (windowed(fixed_img, args.window), windowed(moving_img, args.window))
        if mode == "window"
        else (fixed_img, moving_img)
    )
    kwargs: dict[str, Any] = {"affine_only": True} if method == "affine" else {"similarity": method}
    start = time.perf_counter()
    result = api.register(
        fixed_in,
        moving_in,
        moving_labels={"labels": moving_labels},
        fixed_labels=fixed_labels,
        device=args.device,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    # the HU moving scan through the returned transform (identical to result.warped in 'percentile' mode)
    warped = api.warp_image(moving_img, fixed_img, result.field, result.world_matrix).array
    warped_labels = result.warped_labels["labels"].array
    dice_codes = {n: data["codes"][n] for n in DICE_ORGANS}
    row = evaluate(
        fixed_img,
        fixed_labels.array,
        moving_img,
        warped,
        warped_labels,
        moving_labels.array,
        result.field,
        dice_codes,
        args.window,
    )
    row.update(
        {
            "moving": moving_name,
            "fixed": fixed_name,
            "method": method,
            "intensity": mode,
            "seconds": seconds,
            "registration_seconds": result.metrics["registration_seconds"],
            "api_dice_mean_after": result.metrics.get("dice_mean_after"),
            "api_similarity": result.metrics.get("similarity"),
        }
    )
    return row, warped, warped_labels


# --------------------------------------------------------------------------- report


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = [
        "pair (moving -> fixed)",
        "method",
        "intensity",
        *[f"Dice {v}" for v in DICE_ORGANS.values()],
        "Dice mean",
        "MI before -> after",
        "lNCC before -> after",
        "fold %",
        "s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown_before: set[str] = set()
    for r in rows:
        pair = f"{r['moving']} -> {r['fixed']}"
        if pair not in shown_before:  # one 'before' row per pair
            shown_before.add(pair)
            lines.append(
                "| "
                + " | ".join(
                    [
                        pair,
                        "none (before)",
                        "-",
                        *[f"{r['dice_before'][n]:.3f}" for n in DICE_ORGANS],
                        f"{r['dice_mean_before']:.3f}",
                        f"{r['mi_before']:.3f}",
                        f"{r['local_ncc_before']:.3f}",
                        "-",
                        "-",
                    ]
                )
                + " |"
            )
        lines.append(
            "| "
            + " | ".join(
                [
                    pair,
                    r["method"],
                    r["intensity"],
                    *[f"{r['dice_after'][n]:.3f}" for n in DICE_ORGANS],
                    f"**{r['dice_mean_after']:.3f}**",
                    f"{r['mi_before']:.3f} -> {r['mi_after']:.3f}",
                    f"{r['local_ncc_before']:.3f} -> {r['local_ncc_after']:.3f}",
                    f"{r['folding_percent']:.3f}",
                    f"{r['seconds']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Array reoriented to RAS+ axis order (for display only)."""
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def coronal(array: np.ndarray, affine: np.ndarray, index: int) -> np.ndarray:
    """Coronal slice (A-P index in RAS order), superior up, patient right on the left."""
    return to_ras(array, affine)[:, index, :].T[::-1, ::-1]


def write_figure(
    path: Path,
    data: Mapping[str, Any],
    shown: Mapping[tuple[str, str], Mapping[str, Any]],
    mode: str,
    display: Sequence[float] = (-120.0, 280.0),
) -> Path:
    """Columns = pairs; rows = fixed, moving, warped by affine / NCC / MI (coronal slice through
    the liver's centre, cropped to the body); liver contours: fixed green on every panel,
    moving or warped red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    affine = data["affine"]
    files, liver = data["files"], data["codes"]["liver"]
    load = lambda p: np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)  # noqa: E731
    fixed_seg = load(files["portal_venous"]["labels"]).astype(np.int16)
    index = int(np.round(np.nonzero(to_ras(fixed_seg == liver, affine))[1].mean()))
    spacing = voxel_sizes(affine)[[int(np.argmax(np.abs(affine[a, :3]))) for a in range(3)]]  # RAS order
    aspect = spacing[2] / spacing[0]
    fixed_cor = coronal(load(files["portal_venous"]["image"]), affine, index)
    fixed_liver = coronal(fixed_seg == liver, affine, index)
    body = np.nonzero((fixed_cor > -500).any(axis=0))[0]
    crop = slice(max(int(body.min()) - 2, 0), min(int(body.max()) + 3, fixed_cor.shape[1]))
    pairs = list(dict.fromkeys(p for p, _ in shown))
    rows = ["fixed", "moving", "affine", "ncc", "mi"]
    width = (crop.stop - crop.start) / fixed_cor.shape[0] * aspect**-1
    fig, axes = plt.subplots(
        len(rows), len(pairs), figsize=(5.5 * len(pairs), len(rows) * 5.5 / width + 0.8), squeeze=False
    )
    for col, pair in enumerate(pairs):
        moving_name = pair[0]
        for row, name in enumerate(rows):
            ax = axes[row, col]
            if name == "fixed":
                img, lab, title = fixed_cor, None, "fixed: portal_venous"
            elif name == "moving":
                img = coronal(load(files[moving_name]["image"]), affine, index)
                lab = coronal(load(files[moving_name]["labels"]) == liver, affine, index)
                dice = [v for (p, _), v in shown.items() if p == pair][0]["row"]["dice_before"]["liver"]
                title = f"moving: {moving_name} (liver Dice {dice:.3f})"
            else:
                entry = shown.get((pair, name))
                if entry is None:
                    ax.axis("off")
                    continue
                img = coronal(entry["warped"], affine, index)
                lab = coronal(entry["warped_labels"] == liver, affine, index)
                title = f"warped, {name} ({mode}): liver Dice {entry['row']['dice_after']['liver']:.3f}"
            ax.imshow(
                img[:, crop], cmap="gray", vmin=display[0], vmax=display[1], aspect=aspect, interpolation="nearest"
            )
            ax.contour(fixed_liver[:, crop], levels=[0.5], colors="lime", linewidths=0.9)
            if lab is not None:
                ax.contour(lab[:, crop], levels=[0.5], colors="red", linewidths=0.9)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"coronal slice (RAS A-P index {index}), superior up, patient right on the left, "
        f"HU {display[0]:.0f}..{display[1]:.0f}; liver: fixed green, moving/warped red",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="shared data folder (containing ct/totalsegmentator_example) or that folder itself",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/multiphase_ct"))
    parser.add_argument("--si-mm", type=float, default=10.0, help="max cranial shift at the liver dome (mm)")
    parser.add_argument("--ap-mm", type=float, default=3.0, help="max anterior-posterior shift (mm)")
    parser.add_argument("--random-mm", type=float, default=3.0, help="max norm of the random smooth component (mm)")
    parser.add_argument("--noise", type=float, default=12.0, help="Gaussian noise sigma (HU)")
    parser.add_argument("--texture", type=float, default=1.0, help="factor on the organs' own texture")
    parser.add_argument("--cortex-mm", type=float, default=6.0, help="renal cortex thickness (mm)")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(-200.0, 300.0),
        metavar=("LO", "HI"),
        help="HU window: for the 'window' intensity mode and for all MI/NCC numbers",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("percentile", "window"),
        default=["percentile"],
        help="intensity handling: percentile (the API's default) and/or window (HU clipped first)",
    )
    parser.add_argument("--methods", nargs="+", choices=("affine", "ncc", "mi"), default=["affine", "ncc", "mi"])
    parser.add_argument("--native", action="store_true", help="add the native (unenhanced) -> portal venous pair")
    parser.add_argument("--no-control", dest="control", action="store_false", help="skip the same-phase control pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not args.window[1] > args.window[0]:
        parser.error("--window LO HI needs LO < HI")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    folder = find_dataset(args.data)
    total = time.perf_counter()
    data = build_dataset(folder, args.out, args)
    print(f"simulated phases written to {args.out} (pairs.csv lists the pairs)", flush=True)
    print(
        "organ median HU per phase (before noise): "
        + json.dumps({p: {o: round(v) for o, v in d.items()} for p, d in data["organ_median_hu"].items()}),
        flush=True,
    )
    print(
        "deformations: "
        + json.dumps({k: {a: round(b, 3) for a, b in v.items()} for k, v in data["deformations"].items()}),
        flush=True,
    )
    rows, shown = [], {}
    figure_mode = "window" if "window" in args.modes else args.modes[0]
    for pair in data["pairs"]:
        for mode in args.modes:
            for method in args.methods:
                row, warped, warped_labels = run_method(pair, method, mode, data, args)
                rows.append(row)
                if mode == figure_mode:
                    shown[(pair, method)] = {"row": row, "warped": warped, "warped_labels": warped_labels}
                print(
                    f"  {pair[0]} -> {pair[1]} {method:6s} {mode:10s} Dice mean {row['dice_mean_before']:.3f} -> "
                    f"{row['dice_mean_after']:.3f}  MI {row['mi_before']:.3f} -> {row['mi_after']:.3f}  "
                    f"{row['seconds']:.1f} s",
                    flush=True,
                )
    table = markdown_table(rows)
    print("\n" + table + "\n")
    figure = write_figure(args.out / "figure.png", data, shown, figure_mode)
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "phase_hu": PHASE_HU,
        "organ_median_hu": data["organ_median_hu"],
        "deformations": data["deformations"],
        "rows": rows,
        "table": table,
        "total_seconds": time.perf_counter() - total,
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results: {args.out / 'results.json'}\nfigure: {figure}\ntotal {payload['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
