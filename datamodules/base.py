"""``MultiTaskDataModule``: the loader logic every benchmark shares.

Training yields ``{task: (images, labels)}`` batches through Lightning's ``CombinedLoader``
(``max_size_cycle``: an epoch ends with the largest task, smaller tasks cycle), so joint and
incremental modes see every task in every step. Validation and test return one dataloader
per task, in ``tasks`` order. Under DDP Lightning gives each task's training loader a
``DistributedSampler``; evaluation loaders get an unrepeated sharding so that no sample is
counted twice.
"""
from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from .images import DataLayoutError, SkippingDataLoader, UnknownTaskError, collate_skipping_none
from .transforms import IMAGENET_MEAN, IMAGENET_STD, taps_transforms

__all__ = ["MultiTaskDataModule", "TensorImageDataset", "SPLITS"]

SPLITS = ("train", "val", "test")


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor ``[N, 3, H, W]`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        image = self.transform(image) if self.transform else image.float().div(255)
        return image, int(self.labels[index])


def _loader_class(collate) -> type[DataLoader]:
    """:class:`SkippingDataLoader` for a collate that may give ``None`` (a batch skipped whole)."""
    return SkippingDataLoader if collate is collate_skipping_none else DataLoader


def _unrepeated_sampler(dataset: Dataset):
    """Shard ``dataset`` over DDP ranks without padding (each sample evaluated exactly once)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class MultiTaskDataModule(L.LightningDataModule):
    """Base of every benchmark DataModule.

    Args:
        tasks: which tasks to use (default: all of the benchmark's).
        batch_size: images per task per training step (the joint batch is ``len(tasks) x batch_size``).
        eval_batch_size: images per validation/test batch (default: ``batch_size``).
        num_workers: loader processes per task loader.
        pin_memory: pin host memory (speeds up host-to-GPU copies; ignored on CPU).
        persistent_workers: keep workers alive between epochs.
    """

    def __init__(self, tasks: Sequence[str] | None = None, *, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        super().__init__()
        self._requested_tasks = list(dict.fromkeys(tasks)) if tasks else None  # a task named twice: once
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.datasets: dict[str, dict[str, Dataset]] = {}
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise images with the backbone's ``mean``/``std`` (``experiments.fit`` passes the timm
        model's ``pretrained_cfg`` values; ImageNet's until then). Datasets built so far are rebuilt."""
        self.mean, self.std = tuple(mean), tuple(std)
        self.datasets.clear()

    # -- what subclasses define ---------------------------------------------------------
    @property
    @abstractmethod
    def available_tasks(self) -> dict[str, int]:
        """``{task: num_classes}`` of the whole benchmark."""

    @abstractmethod
    def build_dataset(self, task: str, split: str) -> Dataset:
        """The dataset of one task and split (``train``, ``val`` or ``test``)."""

    def class_names(self, task: str) -> list[str] | None:
        """Name of each label of ``task`` (index = label), or ``None`` when the data has no names.
        ``TaskExport`` stores them in the task file, so predictions can be named without the data."""
        return None

    def eval_transform(self, task: str) -> Callable:
        """What validation and test apply to a decoded RGB image (PIL) of ``task``; used by
        ``experiments.predict`` on new images. Default: the paper's test transform
        (Resize + CenterCrop 224, the backbone's mean/std)."""
        return taps_transforms(train=False, mean=self.mean, std=self.std)

    # -- shared ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        available = self.available_tasks
        if self._requested_tasks is None:
            return list(available)
        unknown = [t for t in self._requested_tasks if t not in available]
        if unknown:
            raise UnknownTaskError(f"unknown task(s) {unknown} for {type(self).__name__} (--data.init_args.tasks); "
                                   f"available: {list(available)}")
        return list(self._requested_tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        """``{task: num_classes}`` of the selected tasks (what the model's heads must be)."""
        available = self.available_tasks
        return {t: available[t] for t in self.tasks}

    def task_location(self, task: str) -> str:
        """Where ``task``'s data is, for messages (a DataModule with a folder per task names it)."""
        return f"{type(self).__name__} task {task!r}"

    def check_classes(self, task: str) -> None:
        """Refuse a task with fewer than 2 classes: a classifier of one class has nothing to learn (its
        loss is 0 from the start) and the accuracy metrics refuse it deep inside torchmetrics."""
        count = self.available_tasks[task]
        if not isinstance(count, int) or count < 2:
            raise DataLayoutError(f"{self.task_location(task)}: task {task!r} has {count} class(es); a "
                                  "classification task needs at least 2. Add the missing class folder(s) or data, "
                                  "or drop the task from --data.init_args.tasks")

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for task in self.tasks:
            self.check_classes(task)
        for task in self.tasks:
            for split in splits.get(stage, SPLITS) if stage else SPLITS:
                self.datasets.setdefault(task, {})
                if split not in self.datasets[task]:
                    self.datasets[task][split] = self.checked_dataset(task, split)

    def checked_dataset(self, task: str, split: str) -> Dataset:
        """:meth:`build_dataset`, refusing an empty split (its loader would train or test on nothing)."""
        dataset = self.build_dataset(task, split)
        if len(dataset) == 0:
            raise DataLayoutError(f"{type(self).__name__}: task {task!r} has no {split} samples; "
                                  "run `python -m datamodules.check` on the data folder to see why")
        return dataset

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = None if train else _unrepeated_sampler(dataset)
        collate = getattr(dataset, "collate_fn", None)
        return _loader_class(collate)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
        )

    def norm_dataset(self, task: str) -> Dataset:
        """``task``'s training images under the evaluation transform: what its BatchNorm
        statistics are re-estimated on (:func:`taps_lightning.recalibrate_norms`). The transform
        is the one this DataModule's validation/test dataset applies to the same kind of stored
        sample; it is deterministic, so the same weights always get the same statistics, and it is
        what validation, test and predict feed the model (statistics of the inputs it will see,
        as FixRes re-estimates them at the test resolution)."""
        cache = self.datasets.setdefault(task, {})
        if "norm" not in cache:
            train = cache["train"] if "train" in cache else self.checked_dataset(task, "train")
            evaluated = next((cache[s] for s in ("val", "test") if s in cache), None)
            if evaluated is None:
                evaluated = cache["test"] = self.checked_dataset(task, "test")
            if not hasattr(train, "transform") or not hasattr(evaluated, "transform"):
                raise TypeError(f"{type(self).__name__}: the {task} datasets have no `transform` attribute to "
                                "share; override norm_dataset() or pass --model.recalibrate_batches 0")
            cache["norm"] = copy.copy(train)
            cache["norm"].transform = evaluated.transform
        return cache["norm"]

    def norm_dataloader(self, task: str, num_batches: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The first ``num_batches x batch_size`` images of a fixed permutation of ``task``'s
        :meth:`norm_dataset` (the same images every time; full batches only, unless the task has
        fewer images than one batch), this process's share of them under DDP. Its own random
        generator: the global RNG (augmentation, shuffling) is not touched."""
        dataset = self.norm_dataset(task)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        chosen = order[: num_batches * self.batch_size]
        batches = [chosen[i:i + self.batch_size].tolist() for i in range(0, len(chosen), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:  # full batches only: a batch of one image
            batches.pop()                                          # has no variance to estimate (BatchNorm refuses it)
        collate = getattr(dataset, "collate_fn", None)
        return _loader_class(collate)(
            dataset, batch_sampler=batches[rank::world_size], collate_fn=collate,
            num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            generator=torch.Generator(),
        )

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({t: self._loader(self.datasets[t]["train"], True) for t in self.tasks}, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[t]["val"], False) for t in self.tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[t]["test"], False) for t in self.tasks]
