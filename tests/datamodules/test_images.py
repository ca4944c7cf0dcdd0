"""Decoding images (datamodules/images.py): corrupt files named, 16-bit greyscale scaled."""
import pytest
import torch
from PIL import Image

from datamodules import ImageFolderTasks
from datamodules.check import check, main as check_main
from datamodules.images import CorruptImageError

from layouts import _folder_tree, _write_16bit, EIGHT_BIT


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
    assert check_main(["imagefolder", str(tmp_path)]) == 2  # problems: data to fix


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
