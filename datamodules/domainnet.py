"""``DomainNet``: six domains, 345 shared classes, the official ``<domain>_{train,test}.txt`` splits."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from .base import MultiTaskDataModule
from .images import DataLayoutError, ImageListDataset, listed_path
from .transforms import taps_transforms

__all__ = ["DomainNet", "read_split_file", "DOMAINNET_DOMAINS", "DOMAINNET_CLASSES"]

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = 345


def read_split_file(path: Path, root: Path, check_files: bool = True) -> list[tuple[str, int]]:
    """``(image path, label)`` from a split file of ``<relative path> <label>`` lines.

    Labels are taken from the file (0..344, one list for all domains), never from folder
    enumeration, so a class absent from one split cannot shift the others. A path outside ``root``
    (absolute, or climbing out with ``..``) is refused (:func:`~datamodules.images.listed_path`).
    """
    if not path.is_file():
        raise DataLayoutError(f"{path}: split file missing; download {path.name} from the DomainNet page into {root}")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, label = line.rsplit(maxsplit=1)
            label = int(label)
        except ValueError:
            raise DataLayoutError(f"{path}:{lineno}: expected '<relative path> <label>', got {line!r}") from None
        if not 0 <= label < DOMAINNET_CLASSES:
            raise DataLayoutError(f"{path}:{lineno}: label {label} outside 0..{DOMAINNET_CLASSES - 1}")
        image = listed_path(root, rel, f"{path}:{lineno}")
        if check_files and not image.is_file():
            raise DataLayoutError(f"{path}:{lineno}: names {image}, which does not exist; unzip {rel.split('/')[0]}.zip "
                                  f"into {root} (or remove the line)")
        samples.append((str(image), label))
    if not samples:
        raise DataLayoutError(f"{path}: no samples")
    return samples


class DomainNet(MultiTaskDataModule):
    """DomainNet (Peng et al., ICCV 2019) as released: ``<root>/<domain>/<class>/<image>`` plus
    ``<root>/<domain>_train.txt`` and ``<root>/<domain>_test.txt``. Validation is the test split
    (as in TAPS); tasks are the domains, in sorted order.

    Args:
        root: the DomainNet folder.
        tasks: domains to use (default: all six).
        check_files: verify that every image named in a split file exists (in ``setup``).
    """

    def __init__(self, root: str, tasks: Sequence[str] | None = None, *, image_size: int = 224,
                 check_files: bool = True, skip_corrupt: bool = False, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 4, pin_memory: bool = True,
                 persistent_workers: bool = True) -> None:
        super().__init__(tasks=sorted(tasks) if tasks else None, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        self.root, self.image_size = Path(root), image_size
        self.check_files, self.skip_corrupt = check_files, skip_corrupt

    @property
    def available_tasks(self) -> dict[str, int]:
        return {d: DOMAINNET_CLASSES for d in DOMAINNET_DOMAINS}

    def samples(self, task: str, split: str) -> list[tuple[str, int]]:
        if not self.root.is_dir():
            raise DataLayoutError(f"{self.root}: DomainNet folder not found; point --data.root at it")
        split = "test" if split == "val" else split
        return read_split_file(self.root / f"{task}_{split}.txt", root=self.root, check_files=self.check_files)

    def eval_transform(self, task: str):
        return taps_transforms(train=False, image_size=self.image_size, mean=self.mean, std=self.std)

    def build_dataset(self, task: str, split: str) -> Dataset:
        transform = taps_transforms(train=True, image_size=self.image_size, mean=self.mean, std=self.std) if split == "train" \
            else self.eval_transform(task)
        return ImageListDataset(self.samples(task, split), transform=transform, skip_corrupt=self.skip_corrupt)
