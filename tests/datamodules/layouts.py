"""Fabricated copies of each official data layout, shared by the DataModule tests."""
import json
from pathlib import Path

from PIL import Image


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
