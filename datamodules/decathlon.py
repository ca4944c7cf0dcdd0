"""``VisualDecathlon``: the ten tasks of the official release, COCO-style annotations, and
the results file the evaluation server accepts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset
from torchvision.transforms import v2

from taps_lightning.files.atomic import atomic_write

from .base import MultiTaskDataModule
from .images import DataLayoutError, ImageListDataset, listed_path
from .transforms import to_normalized_tensor

__all__ = ["VisualDecathlon", "DECATHLON_TASKS", "read_annotations", "write_submission"]

#: Task -> classes, in the paper's table order.
DECATHLON_TASKS = {
    "imagenet12": 1000, "aircraft": 100, "cifar100": 100, "daimlerpedcls": 2, "dtd": 47,
    "gtsrb": 43, "vgg-flowers": 102, "omniglot": 1623, "svhn": 10, "ucf101": 101,
}
#: Per-task mean/std (RGB, [0,1]) from residual_adapters' decathlon_mean_std.pickle.
DECATHLON_MEAN_STD = {
    "imagenet12": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "aircraft": ((0.4798, 0.5107, 0.5344), (0.2107, 0.2051, 0.2373)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "daimlerpedcls": ((0.4820,) * 3, (0.2361,) * 3),
    "dtd": ((0.5270, 0.4703, 0.4240), (0.2523, 0.2409, 0.2499)),
    "gtsrb": ((0.3392, 0.3118, 0.3205), (0.2756, 0.2658, 0.2709)),
    "omniglot": ((0.0810,) * 3, (0.2705,) * 3),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "ucf101": ((0.4995, 0.4988, 0.4998), (0.1090, 0.1081, 0.1068)),
    "vgg-flowers": ((0.4341, 0.3831, 0.2971), (0.2851, 0.2384, 0.2640)),
}
NO_FLIP = {"gtsrb", "omniglot", "svhn"}


def read_annotations(path: Path, root: Path, need_labels: bool = True) -> tuple[list[tuple[str, int]], list[int], list[int]]:
    """``(samples, image_ids, category_ids)`` of one COCO-style annotation file.

    The label of an image is the position of its ``category_id`` in ``categories`` (sorted
    by id): safe even when a split lacks class 0. Unlabelled test files get label -1.
    """
    if not path.is_file():
        raise DataLayoutError(f"{path}: annotation file missing; untar decathlon-1.0-devkit.tar.gz so that "
                              f"{root}/annotations/ exists")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataLayoutError(f"{path}: not valid JSON ({err}); re-download the devkit") from err
    for key in ("images", "categories"):
        if key not in data:
            raise DataLayoutError(f"{path}: no '{key}' list; not a Decathlon annotation file")
    if not data["images"]:
        raise DataLayoutError(f"{path}: lists no images; re-download the devkit")
    category_ids = sorted(c["id"] for c in data["categories"])
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    by_image = {a["image_id"]: a["category_id"] for a in data.get("annotations", [])}
    if need_labels and not by_image:
        raise DataLayoutError(f"{path}: has no annotations (labels); use the labelled file for this split")
    samples, image_ids = [], []
    for img in data["images"]:
        file = listed_path(root, str(img["file_name"]), f"{path}: image {img.get('id')}")
        if not file.is_file():
            raise DataLayoutError(f"{path}: image {img['file_name']} not found under {root}; untar "
                                  f"decathlon-1.0-data.tar.gz (and each <task>.tar) inside {root}/data/")
        if img["id"] in by_image and by_image[img["id"]] not in label_of:
            raise DataLayoutError(f"{path}: image {img['id']} has category {by_image[img['id']]} not in 'categories'")
        samples.append((str(file), label_of[by_image[img["id"]]] if img["id"] in by_image else -1))
        image_ids.append(int(img["id"]))
    return samples, image_ids, category_ids


def write_submission(predictions: dict[str, list[tuple[int, int]]], category_ids: dict[str, list[int]],
                     path: str | Path) -> Path:
    """Write the evaluation server's results JSON: a list of ``{"image_id", "category_id"}``.

    Args:
        predictions: ``{task: [(image_id, predicted label), ...]}``.
        category_ids: ``{task: categories' ids sorted}`` (as returned by :func:`read_annotations`).
    """
    results = [{"image_id": int(image_id), "category_id": int(category_ids[task][label])}
               for task, rows in predictions.items() for image_id, label in rows]
    path = Path(path)
    atomic_write(path, lambda f: f.write(json.dumps(results)), "the Decathlon results file", text=True)
    return path


class VisualDecathlon(MultiTaskDataModule):
    """The Visual Decathlon release (Rebuffi et al., 2017).

    Layout: ``<root>/annotations/<task>_{train,val}.json`` and ``<task>_test_stripped.json``
    (or the labelled ``<task>_test.json`` from residual_adapters' labels_test.zip, preferred
    when present), images at ``<root>/<file_name>`` (``data/<task>/<split>/NNNNNN.jpg``).
    Transforms follow residual_adapters: shorter side 72, random 64 crop + flip for training
    (no flip for gtsrb/omniglot/svhn, which use a 72 centre crop), per-task mean/std.

    Args:
        root: the ``decathlon-1.0`` folder.
        train_on_trainval: train on train+val and validate on val (as the paper reports test accuracy).
    """

    def __init__(self, root: str, tasks: Sequence[str] | None = None, *, train_on_trainval: bool = False,
                 skip_corrupt: bool = False, batch_size: int = 128, eval_batch_size: int | None = 100,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__(tasks=tasks, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers)
        self.root, self.train_on_trainval, self.skip_corrupt = Path(root), train_on_trainval, skip_corrupt
        self.test_ids: dict[str, list[int]] = {}
        self.category_ids: dict[str, list[int]] = {}

    @property
    def available_tasks(self) -> dict[str, int]:
        return dict(DECATHLON_TASKS)

    def annotation_file(self, task: str, split: str) -> Path:
        folder = self.root / "annotations"
        if split == "test" and not (folder / f"{task}_test.json").is_file():
            return folder / f"{task}_test_stripped.json"
        return folder / f"{task}_{split}.json"

    def transform(self, task: str, train: bool):
        mean, std = DECATHLON_MEAN_STD[task]
        if task in NO_FLIP:
            ops = [v2.Resize(72, antialias=True), v2.CenterCrop(72)]
        elif train:
            ops = [v2.Resize(72, antialias=True), v2.RandomCrop(64), v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(72, antialias=True), v2.CenterCrop(64)]
        return v2.Compose(ops + to_normalized_tensor(mean, std))

    def eval_transform(self, task: str):
        return self.transform(task, train=False)

    def build_dataset(self, task: str, split: str) -> Dataset:
        labelled = split != "test" or self.annotation_file(task, "test").name == f"{task}_test.json"
        samples, ids, cats = read_annotations(self.annotation_file(task, split), root=self.root, need_labels=labelled)
        if split == "train" and self.train_on_trainval:
            samples = samples + read_annotations(self.annotation_file(task, "val"), root=self.root)[0]
        if len(cats) != DECATHLON_TASKS[task]:
            raise DataLayoutError(f"{self.annotation_file(task, split)}: {len(cats)} categories, "
                                  f"but {task} has {DECATHLON_TASKS[task]}")
        if split == "test":
            self.test_ids[task], self.category_ids[task] = ids, cats
        return ImageListDataset(samples, transform=self.transform(task, train=split == "train"),
                                skip_corrupt=self.skip_corrupt)
