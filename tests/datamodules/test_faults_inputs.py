"""Data inputs refused or handled as mechanisms (#31 §7): listed paths confined to the data root,
extreme aspect ratios, EXIF orientation, symlink loops, one-class tasks, batches skipped whole,
environment paths and keyword-only DataModule arguments."""
from __future__ import annotations

import inspect
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules
from datamodules import DataLayoutError, DomainNet, EmbeddedDigits, ImageFolderTasks, ImageNetToSketch, VisualDecathlon
from datamodules.check import check
from datamodules import images
from datamodules.images import CorruptImageError, ImageListDataset, collate_skipping_none, load_rgb
from taps_lightning.errors import SettingsError, TapsError


def _png(path: Path, size=(8, 8), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _folder_tasks(root: Path, classes=("x", "y"), per_class=2, size=(8, 8)) -> Path:
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _png(root / "t" / split / c / f"{i}.png", size)
    return root


# -- paths outside the data root -----------------------------------------------------------------
@pytest.mark.parametrize("line", ["../outside.png 3", "{abs} 3", "clipart/../../outside.png 3"])
def test_domainnet_split_line_outside_root_is_refused_and_checked(tmp_path, line):
    root = tmp_path / "domainnet"
    _png(root / "clipart" / "c" / "in.png")
    outside = _png(tmp_path / "outside.png")
    (root / "clipart_train.txt").write_text(f"clipart/c/in.png 3\n{line.format(abs=outside)}\n")
    (root / "clipart_test.txt").write_text("clipart/c/in.png 3\n")
    dm = DomainNet(str(root), tasks=["clipart"], num_workers=0, persistent_workers=False)
    with pytest.raises(DataLayoutError, match=r"clipart_train.txt:2: names .* outside the data root"):
        dm.build_dataset("clipart", "train")
    out = io.StringIO()
    problems = check(dm, decode=False, out=out)
    assert any("clipart_train.txt:2" in p and "outside the data root" in p for p in problems), out.getvalue()


def test_decathlon_annotation_outside_root_is_refused(tmp_path):
    root = tmp_path / "decathlon"
    _png(tmp_path / "outside.png")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "dtd_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "../outside.png"}], "categories": [{"id": 1}],
        "annotations": [{"image_id": 1, "category_id": 1}]}))
    dm = VisualDecathlon(str(root), tasks=["dtd"], num_workers=0, persistent_workers=False)
    with pytest.raises(DataLayoutError, match=r"dtd_train.json: image 1: names '../outside.png', which is outside"):
        dm.build_dataset("dtd", "train")


# -- extreme aspect ratios ----------------------------------------------------------------------
def test_extreme_aspect_ratio_is_refused_by_name_before_resizing(tmp_path):
    """A 1 x 40000 PNG passes PIL's bomb guard; resized to 224 it would be 2.8 GB. Refused by name."""
    thin = _png(tmp_path / "t" / "train" / "x" / "thin.png", size=(1, 40000))
    assert thin.stat().st_size < 2000
    with pytest.raises(images.UnusableImageError, match=r"thin.png: 1 x 40000 pixels, an aspect ratio over"):
        load_rgb(thin)
    assert issubclass(images.UnusableImageError, CorruptImageError) and issubclass(images.UnusableImageError, TapsError)
    ds = ImageListDataset([(str(thin), 0)], transform=lambda im: 1 / 0, skip_corrupt=True)  # never resized
    with pytest.warns(UserWarning, match="thin.png"):
        assert ds[0] == str(thin)


def test_check_lists_extreme_aspect_ratio(tmp_path):
    root = _folder_tasks(tmp_path)
    _png(root / "t" / "test" / "y" / "thin.png", size=(40000, 1))
    out = io.StringIO()
    problems = check(ImageFolderTasks(str(root), num_workers=0, persistent_workers=False), out=out)
    assert any("thin.png" in p and "aspect ratio" in p for p in problems), out.getvalue()
    assert "OK" not in out.getvalue()


# -- EXIF orientation ---------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    """A phone photo: a landscape 40 x 20 frame tagged "rotate 90 CW" (orientation 6) is shown upright,
    20 x 40; the loaders of torchvision and timm would return it sideways."""
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, :20] = 255  # left half white in the stored frame
    img = Image.fromarray(frame)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    loaded = np.asarray(load_rgb(path))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:20].mean() > 200 and loaded[20:].mean() < 50  # rotated 90 CW: the left half is on top


# -- symlink loops ------------------------------------------------------------------------------
def test_symlink_loop_in_a_class_folder_lists_each_image_once(tmp_path):
    root = _folder_tasks(tmp_path)
    (root / "t" / "train" / "x" / "loop").symlink_to("..", target_is_directory=True)
    from datamodules.folder import scan_class_folders

    samples = scan_class_folders(root / "t" / "train", ["x", "y"])
    assert len(samples) == 4, samples


# -- one-class tasks ----------------------------------------------------------------------------
def test_one_class_task_is_refused_naming_task_and_folder(tmp_path):
    root = _folder_tasks(tmp_path, classes=("only",))
    dm = ImageFolderTasks(str(root), num_workers=0, persistent_workers=False)
    with pytest.raises(DataLayoutError, match=r"t/train: task 't' has 1 class\(es\); .* at least 2"):
        dm.setup("fit")
    out = io.StringIO()
    problems = check(ImageFolderTasks(str(root), num_workers=0, persistent_workers=False), out=out)
    assert any("at least 2" in p for p in problems) and "OK" not in out.getvalue()


# -- batches skipped whole ----------------------------------------------------------------------
def test_collate_of_an_all_skipped_batch_is_none_and_names_the_files():
    with pytest.warns(UserWarning, match=r"skipped a whole batch of 2 image\(s\).*a.png, b.png"):
        assert collate_skipping_none([images.SkippedImage("a.png"), images.SkippedImage("b.png")]) is None
    assert collate_skipping_none([None, (torch.zeros(1), 1)])[1].tolist() == [1]


def _corrupt_first_batch(tmp_path, splits=("train", "test")) -> ImageFolderTasks:
    """Two classes x 4 images per split, class x's undecodable in ``splits`` (the first 4 in sorted
    order: the first evaluation batch of 4); class y's decodable."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("x", "y"):
            for i in range(4):
                path = root / "t" / split / c / f"{i}.png"
                if c == "x" and split in splits:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"not a png")
                else:
                    _png(path, (16, 16))
    return ImageFolderTasks(str(root), image_size=16, skip_corrupt=True, batch_size=4, num_workers=0,
                            pin_memory=False, persistent_workers=False)


def test_every_loader_skips_a_batch_skipped_whole(tmp_path):
    dm = _corrupt_first_batch(tmp_path)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = list(dm.val_dataloader()[0])
        train = [b for b in dm.train_dataloader()]
        norm = list(dm.norm_dataloader("t", num_batches=2))
    assert isinstance(dm.val_dataloader()[0], images.SkippingDataLoader)
    assert len(val) == 1 and len(val[0][1]) == 4  # 8 test images, the first batch of 4 all corrupt
    assert all(b is not None for b in val + norm)
    assert all(batch["t"] is not None for batch, *_ in train)


def test_fit_validate_test_with_a_batch_skipped_whole(tmp_path):
    """The consumers end to end: validation and test get a batch skipped whole and run. (Training
    shuffles, so its batches mix skipped and kept images; its loader is checked above.)"""
    from helpers import TINY, cpu_trainer
    from taps_lightning.training.compose import create_taps_module

    dm = _corrupt_first_batch(tmp_path, splits=("test",))
    module = create_taps_module(**TINY, tasks={"t": 2})
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm)


# -- environment paths --------------------------------------------------------------------------
def test_data_home_that_is_a_file_is_refused_first_naming_the_variable(tmp_path, monkeypatch):
    home = tmp_path / "home_is_a_file"
    home.write_text("")
    monkeypatch.setenv("TAPS_DATA_HOME", str(home))
    monkeypatch.setattr("datamodules.embedded.build_embedded_digits",
                        lambda *a, **k: pytest.fail("built the data before checking TAPS_DATA_HOME"))
    with pytest.raises(SettingsError, match=r"TAPS_DATA_HOME=.*home_is_a_file.* is a file.*set TAPS_DATA_HOME"):
        EmbeddedDigits().prepare_data()
    with pytest.raises(SettingsError, match="--data.init_args.root"):
        from datamodules.embedded import load_embedded_digits

        load_embedded_digits(root=home / "sub")


def test_commands_refuse_a_bad_data_home_before_anything_is_built_or_claimed(tmp_path, monkeypatch):
    """fit's first checks (check_data_flags) name TAPS_DATA_HOME: no run folder, no data build."""
    from experiments.fit import main as fit_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TAPS_DATA_HOME", str(tmp_path / "file"))
    monkeypatch.setattr("datamodules.embedded.build_embedded_digits", lambda *a, **k: pytest.fail("built the data"))
    with pytest.raises(SettingsError, match=r"TAPS_DATA_HOME=.*file: .* is a file; set TAPS_DATA_HOME to a folder"):
        fit_main(["--model.backbone", "test_resnet", "--model.weights", "null", "--trainer.default_root_dir",
                  str(tmp_path / "runs")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- keyword-only arguments ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [datamodules.MultiTaskDataModule, ImageFolderTasks, ImageNetToSketch, DomainNet,
                                 VisualDecathlon, EmbeddedDigits])
def test_datamodule_settings_are_keyword_only(cls):
    """Only the root and the tasks may be positional: a setting forwarded by position lands in another
    parameter as soon as one is added (#30)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is not p.KEYWORD_ONLY]
    assert positional in (["tasks"], ["root", "tasks"]), positional


def test_image_net_to_sketch_forwards_every_setting(tmp_path):
    dm = ImageNetToSketch(str(tmp_path), image_size=96, skip_corrupt=True, batch_size=7, eval_batch_size=3,
                          num_workers=0, pin_memory=False, persistent_workers=False)
    assert (dm.image_size, dm.skip_corrupt, dm.batch_size, dm.eval_batch_size, dm.num_workers, dm.pin_memory) == \
        (96, True, 7, 3, 0, False)
    assert dm.cropped_tasks == {"stanford_cars_cropped", "cubs_cropped"}
