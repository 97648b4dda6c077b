"""Networks: the VoxelMorph U-Net (FiLM-conditioned on lambda), its config and checkpoints."""

from voxreg.nn.checkpoint import load_checkpoint, save_checkpoint
from voxreg.nn.unet import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    NetworkConfig,
    NetworkOutput,
    VoxelMorph,
    config_kwargs,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "NetworkConfig",
    "NetworkOutput",
    "VoxelMorph",
    "config_kwargs",
    "load_checkpoint",
    "save_checkpoint",
]
