"""``DomainNet`` (datamodules/domainnet.py): split files, missing files named, lines whose path holds spaces."""
from pathlib import Path

import pytest
from PIL import Image

from datamodules import DataLayoutError, DomainNet
from datamodules.domainnet import read_split_file
from layouts import _domainnet


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (40, 80, 120)).save(path, "JPEG")


def test_split_lines_split_on_the_last_space_so_paths_may_hold_spaces(tmp_path):
    rels = {"clipart/aircraft carrier/clipart 0 1.jpg": 0, "clipart/zebra/a  b.jpg": 344,
            "clipart/the eiffel tower/x.jpg": 17}
    for rel in rels:
        _jpg(tmp_path / rel)
    for split in ("train", "test"):
        (tmp_path / f"clipart_{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in rels.items()))
    expected = [(str(tmp_path / rel), label) for rel, label in rels.items()]
    assert read_split_file(tmp_path / "clipart_train.txt", tmp_path) == expected
    dm = DomainNet(str(tmp_path), tasks=["clipart"], image_size=8, num_workers=0)
    dm.setup("fit")
    assert dm.datasets["clipart"]["train"].samples == expected
    x, y = dm.datasets["clipart"]["val"][0]
    assert x.shape == (3, 8, 8) and y == 0


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
