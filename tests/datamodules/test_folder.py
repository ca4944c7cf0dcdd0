"""ImageFolderTasks and ImageNetToSketch (datamodules/folder.py): labels, listing order, layouts refused or warned about."""
from pathlib import Path

import pytest

from datamodules import DataLayoutError, ImageFolderTasks, ImageNetToSketch
from datamodules.check import main as check_main

from layouts import _folder_tree, _img


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


def test_empty_root_is_refused_by_check_setup_and_fit(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    root = tmp_path / "empty"
    message = rf"{root} has no task folders: expected {root}/<task>/\{{train,test\}}/<class>/<image>"
    assert check_main(["imagefolder", str(root), "--quick"]) == 2  # problems: data to fix
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
    assert check_main(["imagefolder", str(tmp_path), "--quick"]) == 2  # problems: data to fix
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
