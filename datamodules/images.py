"""Image files on disk: PIL decoding, RGB conversion, and errors that name the file."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

__all__ = ["DataLayoutError", "CorruptImageError", "ImageListDataset", "collate_skipping_none", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataLayoutError(FileNotFoundError):
    """The data on disk does not have the benchmark's layout; the message names the path and the fix."""


class CorruptImageError(OSError):
    """An image file that cannot be decoded."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode with PIL (always available, unlike some torchvision.io builds) and convert
    greyscale, palette and CMYK images to RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"{path}: cannot decode image ({err}). Replace or delete the file (and its split-file line), "
            "or pass skip_corrupt=True to skip such files with a warning"
        ) from err


class ImageListDataset(Dataset):
    """``(path, label)`` samples read with PIL.

    Args:
        samples: image paths and integer labels.
        transform: applied to the PIL image.
        skip_corrupt: return ``None`` (dropped by :func:`collate_skipping_none`) for an
            undecodable file and warn with its name, instead of raising.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 skip_corrupt: bool = False) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def collate_fn(self):
        """The loader's collate function: drops skipped images when ``skip_corrupt``."""
        return collate_skipping_none if self.skip_corrupt else None

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            self.skipped.append(str(path))
            warnings.warn(f"skipped corrupt image {path}: {err.__cause__}", stacklevel=2)
            return None
        return (self.transform(image) if self.transform else image), label


def collate_skipping_none(batch):
    """``default_collate`` without the ``None`` entries of skipped corrupt images."""
    return default_collate([item for item in batch if item is not None])
