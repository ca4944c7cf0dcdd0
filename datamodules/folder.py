"""``ImageFolderTasks`` (any ``<root>/<task>/{train,test}/<class>/<image>`` tree) and
``ImageNetToSketch`` (the Piggyback/TAPS release, which has that layout)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Sequence

from torch.utils.data import Dataset

from .base import MultiTaskDataModule
from .images import IMAGE_EXTENSIONS, DataLayoutError, ImageListDataset
from .transforms import taps_transforms

__all__ = ["ImageFolderTasks", "ImageNetToSketch", "scan_class_folders", "class_folders"]


def _visible(path: Path) -> bool:
    """Not a hidden file or folder (``.DS_Store``, ``.ipynb_checkpoints``), which are never data."""
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _names(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (visible) class folders of ``split_dir``."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and _visible(d))


def _files(folder: Path, _above: frozenset[Path] = frozenset()) -> Iterator[Path]:
    """Visible files below ``folder`` in sorted order, hidden folders skipped. A symlink back to a folder
    above (``class/loop -> ..``) is not entered (compared by resolved path): a loop would otherwise list
    the same images again at every depth until the path is too long."""
    here = folder.resolve()
    if here in _above:
        return
    for path in sorted(folder.iterdir()):
        if _visible(path):
            yield from _files(path, _above | {here}) if path.is_dir() else (path,)


def scan_class_folders(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for every image below ``split_dir/<class>/``, label = index in ``classes``.

    The class list is fixed by the training split, so a class missing from another split
    cannot shift the labels (it is warned about: it is never evaluated); a class the training
    split lacks is an error. Files that are not images (by extension) and files outside the
    class folders are warned about by name, never dropped silently; hidden files are ignored.
    """
    index = {c: i for i, c in enumerate(classes)}
    extra = [name for name in class_folders(split_dir) if name not in index]
    if extra:
        raise DataLayoutError(
            f"{split_dir}: class folder(s) {extra[:5]} are not in the training split's classes; "
            "every split must use the training split's class names"
        )
    samples, ignored = [], []
    for path in _files(split_dir):
        label = index.get(path.relative_to(split_dir).parts[0]) if path.parent != split_dir else None
        if label is not None and _is_image(path):
            samples.append((str(path), label))
        else:
            ignored.append(path)
    found = {label for _, label in samples}
    without_images = [name for name in classes if index[name] not in found]
    if ignored:
        warnings.warn(f"{split_dir}: ignored {len(ignored)} file(s), not images ({', '.join(IMAGE_EXTENSIONS)}) "
                      f"in a class folder <class>/: {_names(ignored)}", stacklevel=2)
    if without_images and samples:
        warnings.warn(f"{split_dir}: no images for {len(without_images)} class(es) of the training split "
                      f"{without_images[:5]}; they are never seen in this split (add images or remove the class)",
                      stacklevel=2)
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

    def __init__(self, root: str, tasks: Sequence[str] | None = None, *, image_size: int = 224,
                 cropped_tasks: Sequence[str] = (), expected_classes: dict[str, int] | None = None,
                 skip_corrupt: bool = False, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__(tasks=tasks, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers)
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
        folders = [d for d in sorted(self.root.iterdir()) if d.is_dir() and _visible(d)]
        names = [d.name for d in folders if (d / "train").is_dir()]
        if not names:
            raise DataLayoutError(f"{self.root} has no task folders: expected {self.root}/<task>/{{train,test}}/"
                                  "<class>/<image> (a task is a folder with a train/ sub-folder)")
        if len(names) < len(folders):
            warnings.warn(f"{self.root}: folder(s) {[d.name for d in folders if d.name not in names][:5]} have no "
                          "train/ sub-folder and are not used as tasks", stacklevel=2)
        return names

    def classes(self, task: str) -> list[str]:
        """Class names of ``task`` (sorted folder names of its training split)."""
        if task not in self._classes:
            self._require_root()
            train = self.root / task / "train"
            if not train.is_dir():
                raise DataLayoutError(f"{train}: missing; expected {self.root}/{task}/train/<class>/<image> "
                                      f"(download the benchmark or drop {task!r} from --data.tasks)")
            names = class_folders(train)
            want = self.expected_classes.get(task)
            if want is not None and len(names) != want:
                raise DataLayoutError(f"{train}: {len(names)} class folders, but {task} has {want} classes; "
                                      "the download is incomplete or the folder is another dataset")
            if not names:
                raise DataLayoutError(f"{train}: no class folders; expected {train}/<class>/<image>")
            empty = [train / n for n in names if not any(_is_image(p) for p in _files(train / n))]
            if empty:  # it would still get a head output, which no image ever trains
                raise DataLayoutError(f"{_names(empty)} has no images: remove the empty class folder or add images "
                                      f"({', '.join(IMAGE_EXTENSIONS)})")
            self._classes[task] = names
        return self._classes[task]

    def class_names(self, task: str) -> list[str]:
        return self.classes(task)

    def task_location(self, task: str) -> str:
        return str(self.root / task / "train")

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
        transform = (taps_transforms(train=True, image_size=self.image_size, cropped=cropped,
                                     mean=self.mean, std=self.std) if split == "train"
                     else self.eval_transform(task))
        return ImageListDataset(samples, transform=transform, skip_corrupt=self.skip_corrupt)

    def eval_transform(self, task: str):
        return taps_transforms(train=False, image_size=self.image_size, cropped=task in self.cropped_tasks,
                               mean=self.mean, std=self.std)


#: Folder name -> classes of the Piggyback/TAPS ImageNet-to-Sketch release.
IMAGENET_TO_SKETCH = {"flowers": 102, "stanford_cars_cropped": 196, "sketches": 250, "cubs_cropped": 200, "wikiart": 195}


class ImageNetToSketch(ImageFolderTasks):
    """Flowers, Stanford Cars, Sketch, CUB-200 and WikiArt as released by Piggyback (used by TAPS).

    ``tasks`` selects a subset (the paper trains one model per dataset). ``*_cropped`` tasks
    use the cropped transform. Class counts are checked against the release.
    """

    def __init__(self, root: str, tasks: Sequence[str] | None = None, *, image_size: int = 224,
                 skip_corrupt: bool = False, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__(root=root, tasks=tasks, image_size=image_size,
                         cropped_tasks=[t for t in IMAGENET_TO_SKETCH if t.endswith("_cropped")],
                         expected_classes=IMAGENET_TO_SKETCH, skip_corrupt=skip_corrupt, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
