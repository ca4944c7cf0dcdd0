"""Image files on disk: PIL decoding, RGB conversion, and errors that name the file."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from taps_lightning.errors import TapsError

__all__ = ["DataLayoutError", "UnknownTaskError", "CorruptImageError", "ImageListDataset", "collate_skipping_none",
           "IMAGE_EXTENSIONS", "HIGH_BIT_DEPTH_MODES", "decode_rgb", "load_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

#: PIL modes of 16-bit greyscale images (16-bit PNG/TIFF; older Pillow opens 16-bit PNGs as
#: ``I``): ``convert("RGB")`` clips their samples at 255, which turns almost every pixel
#: white. Pillow already reduces 16-bit RGB(A) and grey+alpha PNGs to 8 bit when it opens them.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataLayoutError(TapsError, FileNotFoundError):
    """The data on disk does not have the benchmark's layout; the message names the path and the fix."""


class UnknownTaskError(DataLayoutError, ValueError):
    """A task name the benchmark (or the data folder) does not have."""


class CorruptImageError(TapsError, OSError):
    """An image file that cannot be decoded."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit greyscale is scaled (``v * 255 / 65535``, rounded), not clipped."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {img.mode} with samples in {values.min()}..{values.max()}, outside the 16-bit "
                             "range 0..65535, so their scale is unknown; save the image with 8 or 16 bits")
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("32-bit float samples have no fixed range to map to 0..255; save the image with 8 or 16 bits")
    return img.convert("RGB")


def decode_rgb(path: str | Path) -> tuple[Image.Image, str]:
    """``(8-bit RGB image, the file's PIL mode)``: :func:`load_rgb` plus the mode, which
    ``datamodules.check`` reports for high bit depth files."""
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img), img.mode
    except Image.DecompressionBombError as err:  # refused from the header, before anything is decoded
        raise CorruptImageError(
            f"{path}: too large to decode ({err}) PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS "
            f"({2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels) as a guard against decompression bombs. Downscale or "
            "delete the file (and its split-file line), or pass skip_corrupt=True to skip such files with a warning"
        ) from err
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"{path}: cannot decode image ({err}). Replace or delete the file (and its split-file line), "
            "or pass skip_corrupt=True to skip such files with a warning"
        ) from err


def load_rgb(path: str | Path) -> Image.Image:
    """Decode with PIL (always available, unlike some torchvision.io builds) and convert
    greyscale, palette, CMYK and 16-bit images to 8-bit RGB."""
    return decode_rgb(path)[0]


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
