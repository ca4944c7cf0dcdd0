"""LightningDataModules for the TAPS benchmarks."""
from .base import MultiTaskDataModule, TensorImageDataset
from .embedded import EmbeddedDigits

__all__ = ["MultiTaskDataModule", "TensorImageDataset", "EmbeddedDigits"]
