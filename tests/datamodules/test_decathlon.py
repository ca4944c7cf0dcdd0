"""``VisualDecathlon`` (datamodules/decathlon.py): annotations, the submission file, and the labelled
``<task>_test.json`` read when it exists beside ``<task>_test_stripped.json``."""
import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules import DataLayoutError, VisualDecathlon, write_submission
from layouts import _decathlon


def _release(root: Path, task="svhn", classes=10, labelled_test=True):
    """A Decathlon root with 4 images per split; category ids 1000 + k (labels k), the test images
    labelled 9, 3, 0, 6 in ``_test.json`` and unlabelled in ``_test_stripped.json``."""
    cats = [{"id": 1000 + k, "name": f"c{k}"} for k in range(classes)]
    labels = {"train": [1, 2, 3, 4], "val": [5, 6, 7, 8], "test": [9, 3, 0, 6]}
    (root / "annotations").mkdir(parents=True)
    for split, ys in labels.items():
        images, anns = [], []
        for i, y in enumerate(ys):
            rel = f"data/{task}/{split}/{i:06d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(root / rel, "JPEG")
            iid = {"train": 0, "val": 100, "test": 200}[split] + i
            images.append({"id": iid, "file_name": rel})
            anns.append({"id": iid, "image_id": iid, "category_id": 1000 + y})
        doc = {"images": images, "categories": cats}
        if split != "test":
            (root / "annotations" / f"{task}_{split}.json").write_text(json.dumps({**doc, "annotations": anns}))
        else:
            (root / "annotations" / f"{task}_test_stripped.json").write_text(json.dumps(doc))
            if labelled_test:
                (root / "annotations" / f"{task}_test.json").write_text(json.dumps({**doc, "annotations": anns}))
    return root


def test_the_labelled_test_file_is_preferred_to_the_stripped_one(tmp_path):
    dm = VisualDecathlon(str(_release(tmp_path / "labelled")), tasks=["svhn"], num_workers=0)
    dm.setup("test")
    assert [y for _, y in dm.datasets["svhn"]["test"].samples] == [9, 3, 0, 6]
    assert dm.test_ids["svhn"] == [200, 201, 202, 203]
    # without it, the stripped file: the same images, unlabelled
    dm = VisualDecathlon(str(_release(tmp_path / "stripped", labelled_test=False)), tasks=["svhn"], num_workers=0)
    dm.setup("test")
    assert [y for _, y in dm.datasets["svhn"]["test"].samples] == [-1, -1, -1, -1]


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
