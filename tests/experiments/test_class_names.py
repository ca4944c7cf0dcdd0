"""Data that changed under a run: a class folder renamed between fit and resume (or evaluate), with
the same class count, shifts the labels; checkpoints and task files record each task's class names
and a mismatch is refused, naming the task and the classes."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import ImageFolderTasks
from taps_lightning.errors import TapsError
from experiments import evaluate, predict
from experiments.fit import main as fit_main
from helpers import taps_trainer
from taps_lightning.training.compose import create_taps_module

CLASSES = ("circle", "square", "triangle")


def make_image_folder(root: Path, tasks=("shapes",), classes=CLASSES, per_class=(3, 2)) -> Path:
    """``root/<task>/{train,test}/<class>/<n>.png``: tiny images whose colour is their class."""
    rng = np.random.default_rng(0)
    for task in tasks:
        for split, n in zip(("train", "test"), per_class):
            for label, name in enumerate(classes):
                folder = root / task / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
                    pixels[..., label % 3] += 200
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _rename(root: Path, task: str, old: str, new: str) -> None:
    for split in ("train", "test"):
        (root / task / split / old).rename(root / task / split / new)


DATA = ["--data", "ImageFolderTasks", "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.persistent_workers", "false"]
TINY = ["--model.backbone", "test_resnet", "--model.weights", "null", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAPS_RUN_VERSION", raising=False)
    root = make_image_folder(tmp_path / "data")
    cli = fit_main(TINY + DATA + ["--data.init_args.root", str(root)])
    run = Path(cli.trainer.log_dir)
    return root, run, Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.mark.slow
def test_renamed_class_folder_is_refused_on_resume_evaluate_and_its_names_kept_by_predict(trained, tmp_path):
    root, run, best = trained
    common = TINY + DATA + ["--data.init_args.root", str(root)]
    _rename(root, "shapes", "square", "box")  # same count, sorted anew: box, circle, triangle
    refused = (r"was trained with other class names than the data has now.*\n  - task 'shapes': only when trained: "
               r"\['square'\]; only in the data: \['box'\]; labels that now mean another class: "
               r"\[0: 'circle' -> 'box', 1: 'square' -> 'circle'\]")
    with pytest.raises(TapsError, match=r"last.ckpt " + refused):
        fit_main(common + ["--ckpt_path", "last", "--trainer.max_epochs", "2"])
    with pytest.raises(TapsError, match=refused):
        evaluate.main(common + ["--ckpt_path", str(best)])
    with pytest.raises(TapsError, match=r"shapes.safetensors\) " + refused):
        evaluate.main(common + ["--tasks_from", str(run / "checkpoints" / "adapters")])
    # predict reads no data: it labels with the names the task was trained with
    image = next((root / "shapes" / "test" / "box").iterdir())
    out = predict.main(common + ["--ckpt_path", str(best), "--images", str(image), "--output",
                                 str(tmp_path / "p.csv"), "--top_k", "3"])
    row = list(csv.reader(open(out)))[1]
    assert sorted(row[2::2]) == sorted(CLASSES)


def test_checkpoint_records_class_names_and_the_module_refuses_changed_ones(tmp_path):
    root = make_image_folder(tmp_path / "data")

    def trainer():
        return taps_trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)

    data = ImageFolderTasks(str(root), image_size=32, batch_size=4, num_workers=0, persistent_workers=False)
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes)
    t = trainer()
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "a.ckpt")
    import torch

    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["taps_class_names"] == {"shapes": list(CLASSES)}
    _rename(root, "shapes", "circle", "disc")  # sorted: disc, square, triangle; label 0 means another class
    data = ImageFolderTasks(str(root), image_size=32, batch_size=4, num_workers=0, persistent_workers=False)
    with pytest.raises(ValueError, match=r"task 'shapes': .*\[0: 'circle' -> 'disc'\]"):
        trainer().validate(create_taps_module(backbone="test_resnet", tasks=data.num_classes), data,
                           ckpt_path=str(tmp_path / "a.ckpt"), weights_only=True)
