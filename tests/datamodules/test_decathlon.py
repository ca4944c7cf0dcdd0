"""``VisualDecathlon`` (datamodules/decathlon.py): the labelled ``<task>_test.json`` is read when
it exists beside ``<task>_test_stripped.json``."""
import json
from pathlib import Path

from PIL import Image

from datamodules import VisualDecathlon


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
