"""DataModules on fabricated copies of each official layout."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules import (DataLayoutError, DomainNet, ImageFolderTasks, ImageNetToSketch, VisualDecathlon,
                         write_submission)
from datamodules.base import _unrepeated_sampler
from datamodules.check import check, main as check_main
from datamodules.images import CorruptImageError


def _img(path: Path, value: int, mode="RGB", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7) if mode == "RGB" else (value, 0, 0, 0)
    Image.new(mode, size, color).save(path, "JPEG")
    return path


def _folder_tree(root: Path, tasks=("flowers", "cars"), classes=3, per_class=2, test_classes=None):
    for task in tasks:
        for split, n_cls in (("train", classes), ("test", test_classes or classes)):
            for c in range(n_cls):
                for i in range(per_class):
                    _img(root / task / split / f"class{c}" / f"{i}.jpg", 40 * c + i, mode="L" if c == 1 else "RGB")
    return root


def test_image_folder_counts_labels_and_greyscale(tmp_path):
    _folder_tree(tmp_path, test_classes=2)  # test lacks class2: labels must not shift
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    assert dm.num_classes == {"cars": 3, "flowers": 3}
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    assert sorted(str(w.message) for w in record) == [
        f"{tmp_path}/{task}/test: no images for 1 class(es) of the training split ['class2']; they are never "
        "seen in this split (add images or remove the class)" for task in ("cars", "flowers")]
    train, val = dm.datasets["flowers"]["train"], dm.datasets["flowers"]["val"]
    assert len(train) == 6 and len(val) == 4
    path, label = train.samples[train.samples.index((str(tmp_path / "flowers/train/class2/1.jpg"), 2))]
    assert label == 2
    image, label = val[2]
    assert label == 1 and image.shape == (3, 8, 8)  # greyscale JPEG converted to RGB


class _Listing:
    """What ``os.scandir`` returns (an iterator and a context manager), over given entries."""

    def __init__(self, entries):
        self._entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass


def _unsorted_listing(monkeypatch, order: str) -> None:
    """Make every directory listing (``os.listdir``, ``os.scandir`` and so ``Path.iterdir``, glob,
    ``os.walk``) come in an order that is not sorted: ``reversed``, or sorted and ``rotated`` by
    two, as some file systems list."""
    import os

    listdir, scandir = os.listdir, os.scandir

    def arrange(items, key):
        items = sorted(items, key=key)
        return items[::-1] if order == "reversed" else items[2:] + items[:2]

    def unsorted_scandir(path="."):
        with scandir(path) as it:
            return _Listing(arrange(list(it), key=lambda e: e.name))

    monkeypatch.setattr(os, "listdir", lambda path=".": arrange(listdir(path), key=str))
    monkeypatch.setattr(os, "scandir", unsorted_scandir)


@pytest.mark.parametrize("order", ["reversed", "rotated"])
def test_label_i_is_the_ith_sorted_class_folder_whatever_the_listing_order(tmp_path, monkeypatch, order):
    """Labels are positions in the sorted class-folder names (code-point order: digits, upper case,
    lower case), never in the order the file system lists them."""
    import os

    names = ["zebra", "Apple", "mango", "banana", "10", "9"]
    by_label = sorted(names)  # ['10', '9', 'Apple', 'banana', 'mango', 'zebra']
    for split in ("train", "test"):
        for name in names:
            for i in range(2):
                _img(tmp_path / "t" / split / name / f"{i}.jpg", 10 * names.index(name) + i)
    _unsorted_listing(monkeypatch, order)
    listed = os.listdir(tmp_path / "t" / "train")
    assert listed != by_label and sorted(listed) == by_label  # the listing really is out of order
    assert [p.name for p in (tmp_path / "t" / "train").iterdir()] == listed

    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=4)
    assert dm.num_classes == {"t": 6} and dm.class_names("t") == by_label
    dm.setup("fit")
    for split in ("train", "val"):
        dataset = dm.datasets["t"][split]
        assert len(dataset.samples) == 12
        for path, label in dataset.samples:
            assert Path(path).parent.name == by_label[label], (split, path, label)
    # and what the loader hands out: each image's colour (red = 10 x its folder's place in `names`)
    # beside the label of that folder
    from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

    val = dm.datasets["t"]["val"]
    for i in range(len(val)):
        image, label = val[i]
        red = float(image[0].mean()) * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
        assert names[round((red - 0.5) / 10)] == by_label[label], (i, red, label)


def test_joint_batches_are_tagged_by_task(tmp_path):
    _folder_tree(tmp_path)
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"cars", "flowers"}
    x, y = batch["cars"]
    assert x.shape == (2, 3, 8, 8) and y.dtype == torch.int64
    assert [len(d) for d in dm.val_dataloader()] == [3, 3]


def test_smaller_tasks_cycle_within_the_largest_tasks_epoch(tmp_path):
    _folder_tree(tmp_path, tasks=("flowers",), classes=3, per_class=4)  # 12 training images: 6 batches of 2
    _folder_tree(tmp_path, tasks=("cars",), classes=2, per_class=2)  # 4 images: 2 batches, cycled 3 times
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    dm.setup("fit")
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == 6
    assert all(set(b) == {"cars", "flowers"} and len(b["cars"][1]) == len(b["flowers"][1]) == 2 for b in batches)
    for start in (0, 2, 4):  # each pass over cars holds all of its images once
        labels = torch.cat([b["cars"][1] for b in batches[start:start + 2]])
        assert sorted(labels.tolist()) == [0, 0, 1, 1]
    flowers = torch.cat([b["flowers"][1] for b in batches])
    assert sorted(flowers.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # the largest task, once


def test_imagenet_to_sketch_checks_class_counts(tmp_path):
    for c in range(102):
        _img(tmp_path / "flowers" / "train" / f"{c:03d}" / "a.jpg", c)
        _img(tmp_path / "flowers" / "test" / f"{c:03d}" / "a.jpg", c)
    dm = ImageNetToSketch(str(tmp_path), tasks=["flowers"], num_workers=0)
    assert dm.num_classes == {"flowers": 102}
    dm.setup("fit")
    assert len(dm.datasets["flowers"]["train"]) == 102
    bad = ImageNetToSketch(str(tmp_path / "missing"), tasks=["wikiart"], num_workers=0)
    with pytest.raises(DataLayoutError, match="missing.*data folder not found"):
        bad.setup("fit")
    _folder_tree(tmp_path, tasks=("wikiart",), classes=3)
    with pytest.raises(DataLayoutError, match=r"wikiart/train: 3 class folders, but wikiart has 195 classes"):
        ImageNetToSketch(str(tmp_path), tasks=["wikiart"], num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="unknown task.*'cars'.*available"):
        ImageNetToSketch(str(tmp_path), tasks=["cars"]).num_classes


def _domainnet(root: Path):
    lines = {"train": [], "test": []}
    for label, cls in enumerate(["aircraft_carrier", "zebra"]):
        for i in range(3):
            rel = f"clipart/{cls}/clipart_{label}_{i}.jpg"
            _img(root / rel, 50 * label + i)
            lines["train" if i < 2 else "test"].append(f"{rel} {label if cls == 'aircraft_carrier' else 344}")
    for split, rows in lines.items():
        (root / f"clipart_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_domainnet_split_files(tmp_path):
    _domainnet(tmp_path)
    dm = DomainNet(str(tmp_path), tasks=["clipart"], image_size=8, num_workers=0)
    assert dm.num_classes == {"clipart": 345}
    dm.setup("fit")
    train = dm.datasets["clipart"]["train"]
    assert len(train) == 4 and len(dm.datasets["clipart"]["val"]) == 2
    assert (str(tmp_path / "clipart/zebra/clipart_1_0.jpg"), 344) in train.samples
    with pytest.raises(DataLayoutError, match="painting_train.txt: split file missing"):
        DomainNet(str(tmp_path), tasks=["painting"], num_workers=0).setup("fit")
    (tmp_path / "clipart/zebra/clipart_1_1.jpg").unlink()
    with pytest.raises(DataLayoutError, match=r"clipart_train.txt:4: names .*clipart_1_1.jpg, which does not exist"):
        DomainNet(str(tmp_path), tasks=["clipart"], num_workers=0).setup("fit")


def _decathlon(root: Path, task="vgg-flowers", prefix=10, classes=102):
    cats = [{"id": prefix * 10**7 + k + 1, "name": f"c{k}", "supercategory": task} for k in range(classes)]
    for split in ("train", "val", "test"):
        images, anns = [], []
        for i in range(3):
            iid = prefix * 10**6 + {"train": 0, "val": 100, "test": 200}[split] + i
            rel = f"data/{task}/{split}/{i:06d}.jpg"
            _img(root / rel, 30 * i)
            images.append({"id": iid, "width": 12, "height": 10, "file_name": rel})
            anns.append({"id": iid, "image_id": iid, "category_id": cats[i * 7]["id"], "segmentation": [], "area": 0,
                         "bbox": [], "iscrowd": 0})
        doc = {"info": {}, "images": images, "categories": cats, "licenses": []}
        name = f"{task}_{split}.json" if split != "test" else f"{task}_test_stripped.json"
        if split != "test":
            doc["annotations"] = anns
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / name).write_text(json.dumps(doc))


def test_visual_decathlon_annotations_and_submission(tmp_path):
    _decathlon(tmp_path)
    dm = VisualDecathlon(str(tmp_path), tasks=["vgg-flowers"], num_workers=0, batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    train = dm.datasets["vgg-flowers"]["train"]
    assert [label for _, label in train.samples] == [0, 7, 14]  # index of category_id in categories
    x, _ = train[0]
    assert x.shape == (3, 64, 64)
    assert [label for _, label in dm.datasets["vgg-flowers"]["test"].samples] == [-1, -1, -1]  # stripped file
    out = write_submission({"vgg-flowers": [(dm.test_ids["vgg-flowers"][0], 101)]}, dm.category_ids,
                           tmp_path / "results.json")
    assert json.loads(out.read_text()) == [{"image_id": 10000200, "category_id": 100000102}]
    with pytest.raises(DataLayoutError, match="svhn_train.json: annotation file missing"):
        VisualDecathlon(str(tmp_path), tasks=["svhn"], num_workers=0).setup("fit")


def test_truncated_jpeg_is_reported_by_name(tmp_path):
    _folder_tree(tmp_path, tasks=("flowers",))
    bad = tmp_path / "flowers/train/class0/0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=6)
    problems = check(dm)
    assert len(problems) == 1 and str(bad) in problems[0] and "skip_corrupt=True" in problems[0]
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=str(bad)):
        next(iter(dm.train_dataloader()))
    skipping = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=6, skip_corrupt=True)
    skipping.setup("fit")
    with pytest.warns(UserWarning, match="skipped corrupt image .*0.jpg"):
        batch, _, _ = next(iter(skipping.train_dataloader()))
    assert len(batch["flowers"][1]) == 5
    assert check_main(["imagefolder", str(tmp_path), "--quick"]) == 0  # layout alone is fine
    assert check_main(["imagefolder", str(tmp_path)]) == 1


def test_eval_sharding_covers_every_sample_once(tmp_path, monkeypatch):
    dataset = list(range(11))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, r=rank: r)
        seen += list(_unrepeated_sampler(dataset))
    assert sorted(seen) == dataset


def test_check_cli_prints_counts(tmp_path, capsys):
    _domainnet(tmp_path)
    assert check_main(["domainnet", str(tmp_path), "--tasks", "clipart"]) == 0
    out = capsys.readouterr().out
    assert "clipart: 345 classes; images: train 4, val 2, test 2" in out and "OK" in out


# -- faults: each of these was accepted silently before -------------------------------------

def _png16(path: Path, values) -> Path:
    """A real 16-bit greyscale PNG (PIL mode ``I;16``)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(values, dtype=np.uint16)).save(path)
    return path


# round(v * 255 / 65535) by hand: 128 / 257 = 0.498 -> 0, 129 / 257 = 0.502 -> 1, 32896 = 128 * 257,
# 65278 = 254 * 257, 65534 / 257 = 254.996 -> 255
SIXTEEN_BIT = [[0, 128, 129, 257], [32896, 65278, 65534, 65535]]
EIGHT_BIT = [[0, 0, 1, 1], [128, 254, 255, 255]]


def _write_16bit(path: Path, kind: str) -> Path:
    import numpy as np

    values = np.array(SIXTEEN_BIT, dtype=np.uint16)
    if kind == "png":
        return _png16(path.with_suffix(".png"), values)
    if kind == "pgm":  # binary PGM, maxval 65535, big-endian samples
        path.with_suffix(".pgm").write_bytes(b"P5 4 2 65535\n" + values.astype(">u2").tobytes())
        return path.with_suffix(".pgm")
    Image.fromarray(values.astype(">u2" if kind == "tiff16b" else np.int32)).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")


@pytest.mark.parametrize("kind,mode", [("png", "I;16"), ("tiff16b", "I;16B"), ("tiff32", "I"), ("pgm", "I")])
def test_16bit_greyscale_is_scaled_to_8bit_not_clipped(tmp_path, kind, mode):
    from torchvision.transforms import v2

    from datamodules.images import ImageListDataset

    path = _write_16bit(tmp_path / "a", kind)
    assert Image.open(path).mode == mode
    image, _ = ImageListDataset([(str(path), 0)], v2.PILToTensor())[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 4)
    for channel in image:
        assert channel.tolist() == EIGHT_BIT


def test_check_names_high_bit_depth_files_and_float_images_are_refused(tmp_path, capsys):
    import numpy as np

    _folder_tree(tmp_path, tasks=("t",), classes=2, per_class=1)
    deep = _png16(tmp_path / "t/train/class0/deep.png", [[1000, 60000]])
    assert check_main(["imagefolder", str(tmp_path)]) == 0  # information, not a problem
    out = capsys.readouterr().out
    assert f"INFO 1 high bit depth image(s) (16-bit greyscale), scaled to 8 bit when loaded: {deep}" in out
    assert "OK: no problems found" in out
    floats = tmp_path / "t/train/class1/float.tif"  # 0..1 or 0..255? nobody can tell: refused by name
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(floats)
    assert check_main(["imagefolder", str(tmp_path)]) == 1
    assert f"PROBLEM {floats}: cannot decode image (32-bit float samples" in capsys.readouterr().out


def test_empty_root_is_refused_by_check_setup_and_fit(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    root = tmp_path / "empty"
    message = rf"{root} has no task folders: expected {root}/<task>/\{{train,test\}}/<class>/<image>"
    assert check_main(["imagefolder", str(root), "--quick"]) == 1
    assert "PROBLEM" in capsys.readouterr().out
    with pytest.raises(DataLayoutError, match=message):
        ImageFolderTasks(str(root), num_workers=0).setup("fit")
    from experiments.fit import main as fit_main

    with pytest.raises(DataLayoutError, match=message):  # about the folder, not "no tasks" from the model
        fit_main(["--data", "ImageFolderTasks", "--data.init_args.root", str(root),
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])


def test_empty_class_folder_is_refused(tmp_path, capsys):
    _folder_tree(tmp_path, tasks=("t",))
    (tmp_path / "t/train/class9").mkdir()  # would get a head output that no image trains
    (tmp_path / "t/train/class8").mkdir()
    (tmp_path / "t/train/class8/notes.txt").write_text("no image here")
    message = f"{tmp_path}/t/train/class8, {tmp_path}/t/train/class9 has no images: remove the empty class folder"
    with pytest.raises(DataLayoutError, match=message):
        ImageFolderTasks(str(tmp_path), num_workers=0).setup("fit")
    assert check_main(["imagefolder", str(tmp_path), "--quick"]) == 1
    assert message in capsys.readouterr().out


def test_ignored_files_and_missing_test_classes_are_warned_by_name(tmp_path, capsys):
    _folder_tree(tmp_path, tasks=("t",), classes=3, per_class=1)
    (tmp_path / "t/train/class0/labels.csv").write_text("x")  # unsupported extension
    _img(tmp_path / "t/train/loose.jpg", 3)  # outside any class folder
    (tmp_path / "t/train/class0/.DS_Store").write_text("x")  # hidden: ignored without a word
    (tmp_path / "t/train/.ipynb_checkpoints").mkdir()  # hidden folder: not a class
    for image in (tmp_path / "t/test/class2").iterdir():
        image.unlink()  # class2 is trained but never tested
    (tmp_path / "notes").mkdir()  # a folder without train/: not a task
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0)
    with pytest.warns(UserWarning) as record:
        assert dm.num_classes == {"t": 3}
        dm.setup("fit")
    messages = "\n".join(str(w.message) for w in record)
    assert f"{tmp_path}/t/train: ignored 2 file(s), not images" in messages
    assert f"{tmp_path}/t/train/class0/labels.csv, {tmp_path}/t/train/loose.jpg" in messages
    assert ".DS_Store" not in messages
    assert f"{tmp_path}/t/test: no images for 1 class(es) of the training split ['class2']" in messages
    assert f"{tmp_path}: folder(s) ['notes'] have no train/ sub-folder" in messages
    assert len(dm.datasets["t"]["train"]) == 3 and len(dm.datasets["t"]["val"]) == 2
    assert check_main(["imagefolder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING") == 3 and "OK: no problems found (3 warning(s))" in out


def test_empty_splits_of_every_benchmark_are_refused(tmp_path):
    _decathlon(tmp_path / "decathlon")
    train = tmp_path / "decathlon/annotations/vgg-flowers_train.json"
    train.write_text(json.dumps({**json.loads(train.read_text()), "images": [], "annotations": []}))
    with pytest.raises(DataLayoutError, match="vgg-flowers_train.json: lists no images"):
        VisualDecathlon(str(tmp_path / "decathlon"), tasks=["vgg-flowers"], num_workers=0).setup("fit")
    (tmp_path / "domainnet").mkdir()
    (tmp_path / "domainnet/clipart_train.txt").write_text("\n")
    with pytest.raises(DataLayoutError, match="clipart_train.txt: no samples"):
        DomainNet(str(tmp_path / "domainnet"), tasks=["clipart"], num_workers=0).setup("fit")
    from tests.helpers import TinyTasks

    with pytest.raises(DataLayoutError, match="task 'a' has no train samples"):  # any other DataModule
        TinyTasks.make(n=0).setup("fit")


def test_class_names_and_eval_transform(tmp_path):
    from datamodules import EmbeddedDigits
    from datamodules.base import TensorImageDataset
    from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
    from helpers import TinyTasks

    _folder_tree(tmp_path)
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0)
    assert dm.class_names("flowers") == ["class0", "class1", "class2"]
    # a plain grey 12x10 image: shorter side to 8, centre 8x8, every pixel (40/255 - mean) / std
    x = dm.eval_transform("flowers")(Image.open(tmp_path / "flowers/test/class1/0.jpg").convert("RGB"))
    grey = (40 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, grey[:, None, None].expand(3, 8, 8), atol=2 / 255 / 0.224, rtol=0)
    # the base's default is the paper's test transform; no names
    tiny = TinyTasks.make()
    assert tiny.class_names("a") is None
    assert tiny.eval_transform("a")(Image.new("RGB", (300, 250))).shape == (3, 224, 224)
    # embedded digits: an image file gets exactly what the stored test image gets
    digits = EmbeddedDigits(resize_to=48)
    assert digits.class_names("sketch") == [str(d) for d in range(10)] and digits.class_names("flowers") is None
    stored = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    from_dataset = TensorImageDataset(stored, torch.zeros(1), digits._transform(train=False))[0][0]
    from_file = digits.eval_transform("mnist")(Image.fromarray(stored[0].permute(1, 2, 0).numpy()))
    assert from_file.shape == (3, 48, 48)
    torch.testing.assert_close(from_file, from_dataset, atol=0, rtol=0)
