"""The paper's transforms (``../shared/benchmarks.md`` §4), overridable per DataModule."""
from __future__ import annotations

from typing import Sequence

from torchvision.transforms import v2
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "taps_transforms", "to_normalized_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """The last steps of every image pipeline: PIL image -> float tensor in [0, 1] -> normalised."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def taps_transforms(train: bool, image_size: int = 224, cropped: bool = False,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """TAPS' ``create_transforms``: RandomResizedCrop + flip for training, Resize + CenterCrop
    (both ``image_size``) for testing; ``cropped`` datasets (CUB, Cars bounding-box crops) are
    resized straight to ``image_size x image_size``."""
    if cropped:
        ops = [v2.Resize((image_size, image_size), antialias=True)] + ([v2.RandomHorizontalFlip()] if train else [])
    elif train:
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(ops + to_normalized_tensor(mean, std))
