"""Training: config, data (real scans, synthetic label-map pairs), augmentation, objective,
the one training loop with exact resume and DDP, and preprocessing of training scans."""

from voxreg.training.config import TrainConfig
from voxreg.training.data import TrainingSet, scan_list
from voxreg.training.trainer import TrainingInterrupted, TrainResult, train, validate

__all__ = ["TrainConfig", "TrainingSet", "TrainResult", "TrainingInterrupted", "train", "validate", "scan_list"]
