"""LightningDataModules for the TAPS benchmarks (and any folder of images)."""
from .base import MultiTaskDataModule, TensorImageDataset
from .decathlon import VisualDecathlon, write_submission
from .domainnet import DomainNet
from .embedded import EmbeddedDigits
from .folder import ImageFolderTasks, ImageNetToSketch
from .images import CorruptImageError, DataLayoutError

__all__ = ["MultiTaskDataModule", "TensorImageDataset", "EmbeddedDigits", "ImageFolderTasks", "ImageNetToSketch",
           "DomainNet", "VisualDecathlon", "write_submission", "DataLayoutError", "CorruptImageError"]
