"""Networks: the VoxelMorph U-Net (FiLM-conditioned on lambda), its config and checkpoints.

Names are imported on first use (PEP 562), so importing the package stays cheap.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
    from voxreg.nn.checkpoint import load_checkpoint, save_checkpoint
    from voxreg.nn.config import NetworkConfig, config_kwargs
    from voxreg.nn.unet import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, NetworkOutput, VoxelMorph

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "load_checkpoint": "voxreg.nn.checkpoint",
        "save_checkpoint": "voxreg.nn.checkpoint",
        "CHECKPOINT_FORMAT": "voxreg.nn.unet",
        "CHECKPOINT_VERSION": "voxreg.nn.unet",
        "NetworkConfig": "voxreg.nn.config",
        "NetworkOutput": "voxreg.nn.unet",
        "VoxelMorph": "voxreg.nn.unet",
        "config_kwargs": "voxreg.nn.config",
    },
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
