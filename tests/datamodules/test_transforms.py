"""Class names and the evaluation transform of each DataModule (datamodules/transforms.py and the DataModules' eval_transform)."""
import torch
from PIL import Image

from datamodules import ImageFolderTasks

from layouts import _folder_tree


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
