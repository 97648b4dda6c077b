"""Models that ship inside the voxreg package (``voxreg/models/``), usable offline.

Each shipped model is a pair of files: ``<name>.pt`` (a voxreg checkpoint, weights possibly
stored in half precision, recording the model's space) and ``<name>.json`` (its card:
description, anatomy, modality, training data and licences, steps, wall time, measured
accuracy). Nothing is ever downloaded. ``voxreg models`` lists them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from voxreg.core.errors import VoxregError

__all__ = ["ShippedModel", "default_model", "shipped_models", "find_shipped", "export_shipped"]

_CARD_KEYS = ("name", "description", "anatomy", "ndim")


@dataclass(frozen=True)
class ShippedModel:
    """A model inside the package: its checkpoint path and its card (a dict)."""

    name: str
    path: Path
    card: dict[str, Any]

    @property
    def ndim(self) -> int:
        """Spatial dimensions the model registers (2 or 3)."""
        return int(self.card["ndim"])

    @property
    def size_mb(self) -> float:
        """Size of the checkpoint file in MB."""
        return self.path.stat().st_size / 1e6

    def unsuited(self, spacing: Sequence[float], extent_mm: Sequence[float]) -> str | None:
        """Why the model does not cover a scan with voxel ``spacing`` and field of view
        ``extent_mm`` (per axis, mm), or None when it does. The card's ``covers`` bounds the
        voxel size (``max_spacing_mm``: thick slices carry too little through-plane detail for
        the model's grid) and the field of view (``max_extent_mm``: e.g. an abdomen is not a
        head); a card without ``covers`` covers every scan of its dimension."""
        covers = self.card.get("covers", {})
        largest = max(float(v) for v in spacing)
        if "max_spacing_mm" in covers and largest > float(covers["max_spacing_mm"]):
            return f"voxels of {largest:g} mm are coarser than the {float(covers['max_spacing_mm']):g} mm it covers"
        widest = max(float(v) for v in extent_mm)
        if "max_extent_mm" in covers and widest > float(covers["max_extent_mm"]):
            return f"a {widest:.0f} mm field of view is wider than the {float(covers['max_extent_mm']):g} mm it covers"
        return None


def models_dir() -> Path:
    """The folder of shipped models inside the installed package."""
    return Path(str(resources.files("voxreg") / "models"))


def shipped_models(folder: Path | None = None) -> list[ShippedModel]:
    """Every shipped model (a ``.pt`` with its ``.json`` card), sorted by name."""
    folder = models_dir() if folder is None else Path(folder)
    out = []
    for card_path in sorted(folder.glob("*.json")):
        checkpoint = card_path.with_suffix(".pt")
        if not checkpoint.is_file():
            continue
        card = json.loads(card_path.read_text(encoding="utf-8"))
        missing = [key for key in _CARD_KEYS if key not in card]
        if missing:
            raise VoxregError(f"{card_path}: model card misses {', '.join(missing)}")
        out.append(ShippedModel(card["name"], checkpoint, card))
    return out


def find_shipped(name: str, folder: Path | None = None) -> ShippedModel:
    """The shipped model called ``name`` (VoxregError listing the available ones otherwise)."""
    models = shipped_models(folder)
    for model in models:
        if model.name == name:
            return model
    names = ", ".join(m.name for m in models) or "none"
    raise VoxregError(f"no shipped model named {name!r} (shipped: {names})")


def default_model(ndim: int, folder: Path | None = None, engine: str = "auto") -> ShippedModel | None:
    """The shipped model ``voxreg register`` uses by default for ``ndim``-D scans (its card
    says ``"default": true``), or None when none ships. With ``engine='network'`` (the network
    alone, no refinement asked by default) a card saying ``"network_default": true`` comes
    first: the model that is best without refinement need not be the best start for it."""
    models = [model for model in shipped_models(folder) if model.ndim == ndim]
    keys = ("network_default", "default") if engine == "network" else ("default",)
    for key in keys:
        for model in models:
            if model.card.get(key, False):
                return model
    return None


def export_shipped(checkpoint: str | Path, folder: Path, card: dict[str, Any], half: bool = True) -> Path:
    """Write a training checkpoint as a shipped model: weights (float16 when ``half``), the
    network config and its model space only — no optimiser state — plus its card."""
    missing = [key for key in _CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"model card misses {', '.join(missing)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from voxreg.nn.checkpoint import save_weights_only  # torch: only when exporting (`voxreg models` needs none)

    path = save_weights_only(checkpoint, folder / f"{card['name']}.pt", half=half)
    (folder / f"{card['name']}.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path
