"""``DomainNet`` (datamodules/domainnet.py): split-file lines whose path holds spaces."""
from pathlib import Path

from PIL import Image

from datamodules import DomainNet
from datamodules.domainnet import read_split_file


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
