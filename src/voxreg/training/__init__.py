"""Training: config, data (real scans, synthetic label-map pairs), augmentation, objective,
the one training loop with exact resume and DDP, and preprocessing of training scans.

Names are imported on first use (PEP 562), so importing the package stays cheap.
"""

from typing import TYPE_CHECKING

from voxreg._lazy import lazy_exports

if TYPE_CHECKING:
    from voxreg.training.config import TrainConfig
    from voxreg.training.data import TrainingSet, scan_list
    from voxreg.training.trainer import TrainingInterrupted, TrainResult, train, validate

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TrainConfig": "voxreg.training.config",
        "TrainingSet": "voxreg.training.data",
        "scan_list": "voxreg.training.data",
        "TrainingInterrupted": "voxreg.training.trainer",
        "TrainResult": "voxreg.training.trainer",
        "train": "voxreg.training.trainer",
        "validate": "voxreg.training.trainer",
    },
)

__all__ = ["TrainConfig", "TrainingSet", "TrainResult", "TrainingInterrupted", "train", "validate", "scan_list"]
