"""Image files on disk: PIL decoding, RGB conversion, and errors that name the file."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate

from taps_lightning.errors import TapsError

__all__ = ["DataLayoutError", "UnknownTaskError", "CorruptImageError", "UnusableImageError", "ImageListDataset",
           "collate_skipping_none", "SkippingDataLoader", "SkippedImage", "IMAGE_EXTENSIONS", "HIGH_BIT_DEPTH_MODES", "MAX_ASPECT_RATIO", "decode_rgb",
           "load_rgb", "listed_path"]

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


class UnusableImageError(CorruptImageError):
    """An image that decodes but cannot be fed to the network (an extreme aspect ratio); skipped by
    ``skip_corrupt`` like an undecodable one, and listed by ``datamodules.check``."""


#: Largest ratio of an image's longer to its shorter side. The test transform resizes the shorter
#: side to ``image_size``, so the longer one becomes ``ratio x image_size``: a 244-byte 1 x 40000 PNG
#: passes PIL's decompression-bomb guard (40,000 pixels) and becomes 224 x 8,960,000 (2.8 GB as
#: floats). 50 keeps any panorama (at most ~10:1) and bounds a resized image to 50 x image_size^2 pixels.
MAX_ASPECT_RATIO = 50


def listed_path(root: Path, listed: str, where: str) -> Path:
    """``root / listed`` for a path a listing (split file, annotation file) names, refused unless it stays
    inside ``root``: an absolute path or one that climbs out with ``..`` (``../x.png``) is a
    :class:`DataLayoutError` naming ``where`` (the listing and line). Checked on the names, not by
    resolving symlinks: a folder of the data root linked to another disk stays usable."""
    relative = os.path.normpath(listed)
    if os.path.isabs(listed) or relative == ".." or relative.startswith(".." + os.sep):
        raise DataLayoutError(f"{where}: names {listed!r}, which is outside the data root {root}; every listed "
                              "image must be a path relative to the root and inside it (fix the line, or move the "
                              "image into the root)")
    return root / relative


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
            _check_aspect_ratio(path, img.size)  # from the header: nothing decoded yet
            img.load()
            return _to_rgb(_upright(img)), img.mode
    except UnusableImageError:
        raise
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


def _check_aspect_ratio(path: str | Path, size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImageError(
            f"{path}: {width} x {height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1; resized to the network's "
            "input (shorter side = image_size) it would take gigabytes. Crop or delete the file (and its split-file "
            "line), or pass skip_corrupt=True to skip such files with a warning")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (PIL.ImageOps.exif_transpose). Phones store a
    photo taken upright as a landscape frame plus "rotate 90" (orientation 6); a viewer shows it
    upright, but PIL, torchvision's and timm's loaders return the frame as stored, so the network would
    train and predict on sideways photos with no warning."""
    orientation = img.getexif().get(0x0112, 1)
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def load_rgb(path: str | Path) -> Image.Image:
    """Decode with PIL (always available, unlike some torchvision.io builds) and convert
    greyscale, palette, CMYK and 16-bit images to 8-bit RGB."""
    return decode_rgb(path)[0]


class SkippedImage(str):
    """What :class:`ImageListDataset` returns for a skipped image: its path (so that a batch skipped as a
    whole can still be named); :func:`collate_skipping_none` drops it."""


class ImageListDataset(Dataset):
    """``(path, label)`` samples read with PIL.

    Args:
        samples: image paths and integer labels.
        transform: applied to the PIL image.
        skip_corrupt: return a :class:`SkippedImage` (dropped by :func:`collate_skipping_none`) for
            an undecodable file and warn with its name, instead of raising.
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
            warnings.warn(f"skipped corrupt image {path}: {err.__cause__ or err}", stacklevel=2)
            return SkippedImage(str(path))
        return (self.transform(image) if self.transform else image), label


def collate_skipping_none(batch):
    """``default_collate`` without the ``None`` entries of skipped corrupt images; ``None`` when every
    image of the batch was skipped (``default_collate([])`` raises IndexError). Every consumer of
    these loaders skips a ``None`` batch (the skipped files were each warned about by name)."""
    kept = [item for item in batch if item is not None and not isinstance(item, SkippedImage)]
    if not kept:
        names = [item for item in batch if isinstance(item, SkippedImage)]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"skipped a whole batch of {len(batch)} image(s), none decodable: {shown or 'none named'}; "
                      "the batch is left out (replace or delete the files)", stacklevel=2)
        return None
    return default_collate(kept)



class SkippingDataLoader(DataLoader):
    """A DataLoader that leaves out the ``None`` batches of :func:`collate_skipping_none` (a batch whose
    every image was skipped), so that no consumer (training, validation, test, BatchNorm re-estimation,
    predict) ever receives one. A subclass, not a wrapper, so that Lightning still re-creates it with
    a DistributedSampler under DDP. Its ``len`` counts the batches before skipping."""

    def __iter__(self):
        return (batch for batch in super().__iter__() if batch is not None)
