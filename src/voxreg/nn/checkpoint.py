"""Checkpoints of VoxelMorph networks: a safe (``weights_only``) torch file holding the
network config, its weights and JSON-like extras (training config, metrics)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from voxreg.core.errors import CheckpointError, one_line
from voxreg.nn.unet import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, NetworkConfig, VoxelMorph

# --------------------------------------------------------------------------- checkpoints


_SAFE_SCALARS = (type(None), bool, int, float, str, torch.Tensor, torch.Size)


def _check_weights_only_safe(value: Any, where: str = "extra") -> None:
    """Raise ValueError if ``value`` could not be read back by ``torch.load(weights_only=True)``."""
    if isinstance(value, _SAFE_SCALARS):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise ValueError(f"{where}: dict key {k!r} must be str/int/float/bool")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} holds a {type(value).__name__}; checkpoints store only "
        "None/bool/int/float/str/tensors and lists/tuples/dicts of them"
    )


def save_checkpoint(path: str | os.PathLike[str], model: VoxelMorph, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + weights) and ``extra`` to ``path`` atomically.

    ``extra`` (e.g. epoch, optimiser state, metrics) may hold only plain Python values
    and tensors so that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    if not isinstance(model, VoxelMorph):
        raise ValueError(f"model must be a VoxelMorph, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_weights_only_safe(extra)
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra if extra is not None else {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read_payload(path: Path, device: str | torch.device) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything on garbage
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path} is not a voxreg checkpoint: it holds pickled objects other "
                "than tensors and plain values (refused for safety)"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch file, corrupted or "
            f"truncated ({one_line(str(exc) or type(exc).__name__, 160)})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a voxreg checkpoint (no 'format': "
            f"'{CHECKPOINT_FORMAT}' entry; a raw state_dict or another model?)"
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has unsupported version {version!r} (this voxreg reads up to {CHECKPOINT_VERSION})"
        )
    for key, kind in (("config", dict), ("state_dict", dict), ("extra", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"checkpoint {path} is damaged: '{key}' missing or not a {kind.__name__}")
    return payload


def _state_mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """Describe (in one line) why ``state`` does not fit ``model``, or None if it does."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
    for k, v in state.items():
        if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            problems.append(f"shape mismatch for {k}: checkpoint {got} vs model {tuple(expected[k].shape)}")
            break
    return "; ".join(problems) if problems else None


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[VoxelMorph, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(model on device, extra)``.

    Raises :class:`~voxreg.errors.CheckpointError` (one-line message naming the file) when
    the file is missing, unreadable, not a voxreg checkpoint, or its weights do not fit
    its config. The model is returned in eval mode.
    """
    path = Path(path)
    payload = _read_payload(path, device)
    try:
        config = NetworkConfig.from_dict(payload["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has an invalid config: {one_line(str(exc) or type(exc).__name__, 160)}"
        ) from exc
    model = VoxelMorph(config)
    problem = _state_mismatch(model, payload["state_dict"])
    if problem:
        raise CheckpointError(f"checkpoint {path} weights do not match its config: {problem}")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:  # pragma: no cover - caught by _state_mismatch above
        raise CheckpointError(
            f"checkpoint {path} weights do not match its config: {one_line(str(exc) or type(exc).__name__, 160)}"
        ) from exc
    return model.to(device).eval(), payload["extra"]


#: extras a weights-only checkpoint keeps (what inference and a continued training need to know)
WEIGHTS_ONLY_EXTRAS = ("model_space", "train_config", "step", "seconds")


def save_weights_only(checkpoint: str | os.PathLike[str], path: str | os.PathLike[str], half: bool = False) -> Path:
    """Copy of a training checkpoint without optimiser, scheduler and RNG state: the network
    (float16 weights when ``half``) and :data:`WEIGHTS_ONLY_EXTRAS` — a few MB less, small
    enough to ship or commit; training continues from it with ``voxreg train --init``."""
    model, extra = load_checkpoint(checkpoint)
    keep = {key: extra[key] for key in WEIGHTS_ONLY_EXTRAS if key in extra}
    return save_checkpoint(path, model.half() if half else model, keep)
