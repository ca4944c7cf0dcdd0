"""python -m datamodules.check (datamodules/check.py): counts, information and problems printed."""
from PIL import Image

from datamodules.check import main as check_main

from layouts import _domainnet, _folder_tree, _png16


def test_check_cli_prints_counts(tmp_path, capsys):
    _domainnet(tmp_path)
    assert check_main(["domainnet", str(tmp_path), "--tasks", "clipart"]) == 0
    out = capsys.readouterr().out
    assert "clipart: 345 classes; images: train 4, val 2, test 2" in out and "OK" in out


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
    assert check_main(["imagefolder", str(tmp_path)]) == 2  # problems: data to fix
    assert f"PROBLEM {floats}: cannot decode image (32-bit float samples" in capsys.readouterr().out
