"""``ImageFolderTasks`` (any ``<root>/<task>/{train,test}/<class>/<image>`` tree) and
``ImageNetToSketch`` (the Piggyback/TAPS release, which has that layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from .base import MultiTaskDataModule
from .images import IMAGE_EXTENSIONS, DataLayoutError, ImageListDataset
from .transforms import taps_transforms

__all__ = ["ImageFolderTasks", "ImageNetToSketch", "scan_class_folders"]


def scan_class_folders(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for every image below ``split_dir/<class>/``, label = index in ``classes``.

    The class list is fixed by the training split, so a class missing from another split
    (DomainNet's painting/t-shirt) cannot shift the labels; a class the training split lacks
    is an error.
    """
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in index)
    if extra:
        raise DataLayoutError(
            f"{split_dir}: class folder(s) {extra[:5]} are not in the training split's classes; "
            "every split must use the training split's class names"
        )
    samples = []
    for name in classes:
        folder = split_dir / name
        if folder.is_dir():
            samples += [(str(p), index[name]) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return samples


class ImageFolderTasks(MultiTaskDataModule):
    """Any set of classification tasks stored as ``<root>/<task>/{train,test}/<class>/<image>``.

    Validation uses ``<task>/val`` when present, else ``<task>/test`` (as TAPS and Piggyback
    do: these releases have no separate validation split).

    Args:
        root: folder holding one sub-folder per task.
        tasks: task folders to use (default: every sub-folder with a ``train/``).
        image_size: crop size fed to the network.
        cropped_tasks: tasks whose images are pre-cropped to the object (resized, not cropped).
        expected_classes: ``{task: classes}`` to verify against the folders.
        skip_corrupt: skip undecodable images with a warning instead of stopping.
    """

    def __init__(self, root: str, tasks: Sequence[str] | None = None, image_size: int = 224,
                 cropped_tasks: Sequence[str] = (), expected_classes: dict[str, int] | None = None,
                 skip_corrupt: bool = False, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__(tasks, batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        self.root = Path(root)
        self.image_size = image_size
        self.cropped_tasks = set(cropped_tasks)
        self.expected_classes = dict(expected_classes or {})
        self.skip_corrupt = skip_corrupt
        self._classes: dict[str, list[str]] = {}

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise DataLayoutError(f"{self.root}: data folder not found; point --data.root at the folder that holds "
                                  "one sub-folder per task (<root>/<task>/train/<class>/<image>)")

    def _task_names(self) -> list[str]:
        if self.expected_classes:
            return list(self.expected_classes)
        self._require_root()
        return sorted(d.name for d in self.root.iterdir() if (d / "train").is_dir())

    def classes(self, task: str) -> list[str]:
        """Class names of ``task`` (sorted folder names of its training split)."""
        if task not in self._classes:
            self._require_root()
            train = self.root / task / "train"
            if not train.is_dir():
                raise DataLayoutError(f"{train}: missing; expected {self.root}/{task}/train/<class>/<image> "
                                      f"(download the benchmark or drop {task!r} from --data.tasks)")
            names = sorted(d.name for d in train.iterdir() if d.is_dir())
            want = self.expected_classes.get(task)
            if want is not None and len(names) != want:
                raise DataLayoutError(f"{train}: {len(names)} class folders, but {task} has {want} classes; "
                                      "the download is incomplete or the folder is another dataset")
            if not names:
                raise DataLayoutError(f"{train}: no class folders; expected {train}/<class>/<image>")
            self._classes[task] = names
        return self._classes[task]

    def class_names(self, task: str) -> list[str]:
        return self.classes(task)

    @property
    def available_tasks(self) -> dict[str, int]:
        return {t: self.expected_classes.get(t) or len(self.classes(t)) for t in self._task_names()}

    def split_dir(self, task: str, split: str) -> Path:
        base = self.root / task
        if split == "val":
            split = "val" if (base / "val").is_dir() else "test"
        path = base / split
        if not path.is_dir():
            raise DataLayoutError(f"{path}: missing; expected {base}/{split}/<class>/<image>")
        return path

    def setup(self, stage: str | None = None) -> None:
        for task in self.tasks:  # cheap layout check first, so a long run fails at once
            self.classes(task)
            for split in ("train", "test"):
                self.split_dir(task, split)
        super().setup(stage)

    def build_dataset(self, task: str, split: str) -> Dataset:
        samples = scan_class_folders(self.split_dir(task, split), self.classes(task))
        if not samples:
            raise DataLayoutError(f"{self.split_dir(task, split)}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        cropped = task in self.cropped_tasks
        transform = taps_transforms(True, self.image_size, cropped) if split == "train" else self.eval_transform(task)
        return ImageListDataset(samples, transform, self.skip_corrupt)

    def eval_transform(self, task: str):
        return taps_transforms(False, self.image_size, cropped=task in self.cropped_tasks)


#: Folder name -> classes of the Piggyback/TAPS ImageNet-to-Sketch release.
IMAGENET_TO_SKETCH = {"flowers": 102, "stanford_cars_cropped": 196, "sketches": 250, "cubs_cropped": 200, "wikiart": 195}


class ImageNetToSketch(ImageFolderTasks):
    """Flowers, Stanford Cars, Sketch, CUB-200 and WikiArt as released by Piggyback (used by TAPS).

    ``tasks`` selects a subset (the paper trains one model per dataset). ``*_cropped`` tasks
    use the cropped transform. Class counts are checked against the release.
    """

    def __init__(self, root: str, tasks: Sequence[str] | None = None, image_size: int = 224,
                 skip_corrupt: bool = False, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__(root, tasks, image_size, [t for t in IMAGENET_TO_SKETCH if t.endswith("_cropped")],
                         IMAGENET_TO_SKETCH, skip_corrupt, batch_size, eval_batch_size, num_workers, pin_memory,
                         persistent_workers)
