"""experiments.evaluate and experiments.predict on tiny fit runs: the numbers fit printed, task
files of two runs mixed on one base, predictions against the gated model, and bad input."""
import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import taps_lightning as tl
from callbacks.export import adapter_dir

from experiments import evaluate, predict
from experiments.fit import main as fit_main
from helpers import tiny_resnet
from taps_lightning.errors import TapsError
from taps_lightning.training.lightning_module import TapsModule

ROOT = Path(__file__).resolve().parents[2]
#: a tiny model on a little of the embedded data, at its stored 32 px
TINY = ["--model.backbone", "test_resnet", "--model.weights", "null", "--data.resize_to", "32",
        "--data.max_train_per_task", "64", "--data.batch_size", "16", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@dataclass
class Run:
    ckpt: Path
    adapters: Path
    config: Path
    test_acc: dict[str, float]  # report.csv of fit's own test of the best checkpoint


def _accuracies(report_csv: Path) -> dict[str, float]:
    with open(report_csv) as f:
        return {row["task"]: float(row["accuracy"]) for row in csv.DictReader(f) if row["task"] != "total / mean"}


def _fit(name: str, tasks: str, *extra: str) -> Run:
    trainer = fit_main(TINY + ["--data.tasks", tasks, "--trainer.logger.init_args.name", name, *extra]).trainer
    log_dir = Path(trainer.log_dir)
    return Run(Path(trainer.checkpoint_callback.best_model_path), adapter_dir(trainer), log_dir / "config.yaml",
               _accuracies(log_dir / "report.csv"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fit runs on the same (seeded) test_resnet base with different tasks."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAPS_DATA_HOME", str(root / "data"))
        mp.chdir(root)
        return root, _fit("a", "[mnist, sketch]"), _fit("b", "[uci_digits]")


@pytest.fixture
def in_root(runs, monkeypatch):
    root, a, b = runs
    monkeypatch.setenv("TAPS_DATA_HOME", str(root / "data"))
    monkeypatch.chdir(root)
    return a, b


def _evaluate(args) -> tuple[dict[str, float], Path]:
    trainer = evaluate.main(args).trainer
    log_dir = Path(trainer.log_dir)
    return _accuracies(log_dir / "report.csv"), log_dir


@pytest.mark.slow
def test_evaluate_checkpoint_equals_fit_test(in_root):
    a, _ = in_root
    accs, log_dir = _evaluate(["--config", str(a.config), "--ckpt_path", str(a.ckpt),
                               "--trainer.logger.init_args.name", "eval_ckpt"])
    assert accs == a.test_acc and set(accs) == {"mnist", "sketch"}
    assert "(test set)" in (log_dir / "report.md").read_text()
    assert (log_dir / "layer_selection.png").is_file() and (log_dir / "scores.png").is_file()
    assert not (log_dir / "checkpoints").exists()  # no checkpoint or adapter export from an evaluation
    # the validation split: the mean equals the best val/acc ModelCheckpoint recorded during training
    accs, log_dir = _evaluate(["--config", str(a.config), "--ckpt_path", str(a.ckpt), "--split", "val",
                               "--trainer.logger.init_args.name", "eval_val"])
    saved = torch.load(a.ckpt, weights_only=True)["callbacks"]
    best = next(v["best_model_score"] for k, v in saved.items() if k.startswith("ModelCheckpoint"))
    assert sum(accs.values()) / len(accs) == pytest.approx(100 * float(best), abs=1e-4)
    assert "(val set)" in (log_dir / "report.md").read_text()


@pytest.mark.slow
def test_evaluate_mixes_task_files_of_two_runs(in_root):
    a, b = in_root
    accs, _ = _evaluate(TINY + ["--tasks_from", str(a.adapters / "mnist.safetensors"),
                                str(b.adapters / "uci_digits.safetensors"), "--trainer.logger.init_args.name", "mixed"])
    assert accs == {"mnist": a.test_acc["mnist"], "uci_digits": b.test_acc["uci_digits"]}
    accs, _ = _evaluate(TINY + ["--tasks_from", str(a.adapters / "*.safetensors"),
                                "--trainer.logger.init_args.name", "glob"])
    assert accs == a.test_acc
    # one task of a run, with that run's config (which lists both of its tasks)
    accs, _ = _evaluate(["--config", str(a.config), "--tasks_from", str(a.adapters / "sketch.safetensors"),
                         "--trainer.logger.init_args.name", "one"])
    assert accs == {"sketch": a.test_acc["sketch"]}


@pytest.mark.slow
def test_evaluate_refuses_task_files_of_another_base(in_root):
    a, _ = in_root
    task_file = str(a.adapters / "mnist.safetensors")
    with pytest.raises(tl.TaskFileError, match="mnist.safetensors: trained on different shared weights"):
        evaluate.main(TINY + ["--tasks_from", task_file, "--seed_everything", "1"])  # another random base
    with pytest.raises(tl.TaskFileError, match="mnist.safetensors: made for backbone 'test_resnet'"):
        evaluate.main(TINY + ["--tasks_from", task_file, "--model.backbone", "test_efficientnet"])
    with pytest.raises(TapsError, match=r"--data.tasks \['sketch'\] lacks \['mnist'\] of .*mnist.safetensors"):
        evaluate.main(TINY + ["--tasks_from", task_file, "--data.tasks", "[sketch]"])


@pytest.mark.slow
def test_evaluate_memory_efficient_checkpoint_in_its_taps_phase(in_root):
    # the checkpoint is of the TAPS phase; a fresh Trainer starts at epoch 0, the joint phase
    run = _fit("me", "[mnist, sketch]", "--trainer.max_epochs", "2", "--model.mode", "memory_efficient",
               "--model.lr", "0.05", "--checkpoint.monitor", "null")  # the last epoch's checkpoint is tested
    accs, _ = _evaluate(["--config", str(run.config), "--ckpt_path", str(run.ckpt),
                         "--trainer.logger.init_args.name", "eval_me"])
    assert accs == run.test_acc


@pytest.mark.slow
def test_evaluate_under_ddp_equals_fit_test(in_root, runs):
    a, _ = in_root
    root = runs[0]
    env = {**os.environ, "TAPS_DATA_HOME": str(root / "data"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "--config", str(a.config), "--ckpt_path", str(a.ckpt),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.logger.init_args.name", "eval_ddp"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = next((root / "logs" / "eval_ddp").glob("version_*/report.csv"))
    assert _accuracies(report) == a.test_acc


def _digit_images(folder: Path) -> tuple[list[Path], torch.Tensor]:
    """Three stored mnist test digits as PNGs (32 px) and one upscaled to 40x48 (not square)."""
    stored = sorted(Path(os.environ["TAPS_DATA_HOME"]).rglob("digits_v*_s32_seed0.pt"))  # what TINY's runs built
    assert len(stored) == 1, stored
    data = torch.load(stored[0], weights_only=True)
    images = data["mnist"]["test"][0][:3]
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    wide = F.interpolate(images[:1].float(), size=(40, 48), mode="nearest").to(torch.uint8)[0]
    paths.append(folder / "wide.png")
    Image.fromarray(wide.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths, wide


def _expected_inputs(paths: list[Path], wide: torch.Tensor) -> torch.Tensor:
    """By hand: [0, 1] floats, shorter side resized to 32 (40x48 -> 32x38), centre 32x32, normalised."""
    x = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
         for p in paths[:3]]
    resized = F.interpolate(wide[None].float() / 255, size=(32, 38), mode="bilinear", antialias=True, align_corners=False)
    x.append(resized[0, :, :, 3:35])
    cfg = timm.create_model("test_resnet").pretrained_cfg  # fit and predict normalise as the backbone's weights expect
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    return (torch.stack(x) - mean) / std


def _read_predictions(path: Path) -> dict[tuple[str, str], tuple[list[str], list[float]]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["path", "task", "label_1", "probability_1"]
    return {(Path(r[0]).name, r[1]): (r[2::2], [float(p) for p in r[3::2]]) for r in rows[1:]}


@pytest.mark.slow
def test_predict_equals_softmax_of_the_gated_model(in_root, tmp_path):
    a, _ = in_root
    paths, wide = _digit_images(tmp_path / "images")
    module = TapsModule.load_from_checkpoint(a.ckpt, weights_only=True).eval()
    x = _expected_inputs(paths, wide)
    with torch.no_grad():
        expected = {task: module.model(x, task).softmax(-1) for task in ("mnist", "sketch")}

    out = predict.main(TINY + ["--ckpt_path", str(a.ckpt), "--images", str(tmp_path / "images"), "--top_k", "3",
                               "--output", str(tmp_path / "out" / "ckpt.csv")])
    rows = _read_predictions(out)
    assert len(rows) == 4 * 2
    for task, probs in expected.items():
        for i, path in enumerate(paths):
            labels, p = rows[(path.name, task)]
            top = probs[i].topk(3)
            assert labels == [str(j) for j in top.indices.tolist()]  # EmbeddedDigits' names are the digits
            assert p == pytest.approx(top.values.tolist(), abs=2e-6)

    # task files: the names fit stored at export, and names given to save_task
    assert tl.task_metadata(a.adapters / "mnist.safetensors")["class_names"] == [str(d) for d in range(10)]
    named = tl.save_task(module.model, "sketch", tmp_path / "sketch.safetensors",
                         class_names=[f"digit {d}" for d in range(10)])
    for gated in ("false", "true"):
        out = predict.main(TINY + ["--tasks_from", str(named), "--images", str(tmp_path / "images" / "*.png"),
                                   "--top_k", "2", "--gated", gated, "--output", str(tmp_path / f"files_{gated}.csv")])
        rows = _read_predictions(out)
        assert {task for _, task in rows} == {"sketch"}
        for i, path in enumerate(paths):
            labels, p = rows[(path.name, "sketch")]
            top = expected["sketch"][i].topk(2)
            assert labels == [f"digit {j}" for j in top.indices.tolist()]
            assert p == pytest.approx(top.values.tolist(), abs=1e-5)  # merged weights: float rounding only

    # top_k above the 10 classes: every class once, probabilities summing to 1, the last cells empty
    out = predict.main(TINY + ["--ckpt_path", str(a.ckpt), "--images", str(paths[0]), "--tasks", "mnist",
                               "--top_k", "11", "--output", str(tmp_path / "all.csv")])
    with open(out) as f:
        header, row = list(csv.reader(f))
    assert len(header) == len(row) == 2 + 2 * 11 and row[-2:] == ["", ""]
    assert sorted(row[2:-2:2]) == [str(d) for d in range(10)]
    assert sum(float(p) for p in row[3:-2:2]) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_predict_bad_input_names_the_file_and_writes_nothing(in_root, tmp_path):
    a, _ = in_root
    paths, _ = _digit_images(tmp_path / "images")
    out = tmp_path / "out"
    common = TINY + ["--ckpt_path", str(a.ckpt), "--output", str(out / "p.csv")]
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match=r"broken.png: cannot decode image"):
        predict.main(common + ["--images", str(tmp_path / "images")])
    assert not out.exists() or not any(out.iterdir())  # neither the CSV nor its temporary file
    with pytest.raises((SystemExit, TapsError), match=r"--images: .*missing.png: no such file"):
        predict.main(common + ["--images", str(paths[0]), str(tmp_path / "missing.png")])
    with pytest.raises(TapsError, match=r"--tasks: \['clipart'\] not in .*best.*ckpt, which holds \['mnist', 'sketch'\]"):
        predict.main(common + ["--images", str(paths[0]), "--tasks", "clipart"])
    with pytest.raises(tl.TaskFileError, match="mnist.safetensors: made for backbone 'test_resnet'"):
        predict.main(TINY + ["--tasks_from", str(a.adapters / "mnist.safetensors"), "--images", str(paths[0]),
                             "--model.backbone", "test_efficientnet", "--output", str(out / "p.csv")])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("main", [evaluate.main, predict.main], ids=["evaluate", "predict"])
def test_bad_flags_are_refused_before_anything_is_built(main, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    model = tiny_resnet({"mnist": 10})
    for name in ("a", "b"):
        tl.save_task(model, "mnist", tmp_path / name / "mnist.safetensors")
    cases = {
        "give either --ckpt_path": [],
        "give either --ckpt_path PATH.ckpt": ["--ckpt_path", str(junk), "--tasks_from", str(tmp_path)],
        "--ckpt_path last resumes training": ["--ckpt_path", "last"],
        "missing.ckpt: no such file": ["--ckpt_path", str(tmp_path / "missing.ckpt")],
        "junk.ckpt: not a readable checkpoint": ["--ckpt_path", str(junk)],
        "empty: matches no .safetensors file": ["--tasks_from", str(tmp_path / "empty")],
        "nope/.*safetensors: matches no .safetensors file": ["--tasks_from", str(tmp_path / "nope" / "*.safetensors")],
        r"a/mnist.safetensors and .*b/mnist.safetensors both hold task 'mnist'":
            ["--tasks_from", str(tmp_path / "a" / "mnist.safetensors"), str(tmp_path / "b")],
        "--tasks_from loads TAPS task files, but --model.mode is 'linear'":
            ["--tasks_from", str(tmp_path / "a"), "--model.mode", "linear"],
    }
    for message, args in cases.items():  # --images/--tasks_from expansion raises SettingsError (a TapsError)
        with pytest.raises((SystemExit, TapsError), match=message):
            main(args + ["--images", str(tmp_path)] if main is predict.main else args)


# -- fast: a task file made here, tiny image folders, no fit ----------------------------------

FOLDER_CLASSES = ["circle", "square", "triangle"]


def _shapes_folder(root: Path, per_split=(3, 2)) -> Path:
    """``root/shapes/{train,test}/<class>/<i>.png``: 32 px images, one bright channel per class."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_split):
        for label, name in enumerate(FOLDER_CLASSES):
            (root / "shapes" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
                pixels[..., label] += 200
                Image.fromarray(pixels).save(root / "shapes" / split / name / f"{i}.png")
    return root


def _shapes_task_file(path: Path) -> Path:
    """A test_resnet task ``shapes`` on the base the CLI builds (seed 0), with random deltas and
    running statistics far from what its images give."""
    from helpers import randomize_tasks

    torch.manual_seed(0)
    model = tl.create_taps_model("test_resnet", {"shapes": 3})
    randomize_tasks(model)
    return tl.save_task(model, "shapes", path, class_names=FOLDER_CLASSES)


def _running_stats(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    stats = {k: v for k, v in load_file(path).items() if "running_" in k}
    assert stats  # test_resnet's BatchNorms
    return stats


def test_evaluate_recalibrate_batches_0_keeps_the_stored_statistics_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _shapes_folder(tmp_path / "data")
    task_file = _shapes_task_file(tmp_path / "shapes.safetensors")
    common = ["--model.backbone", "test_resnet", "--model.weights", "null", "--tasks_from", str(task_file),
              "--data", "ImageFolderTasks", "--data.init_args.root", str(root), "--data.init_args.image_size", "32",
              "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
              "--data.init_args.persistent_workers", "false", "--trainer.enable_progress_bar", "false"]
    stored = _running_stats(task_file)

    def evaluated(batches: str, name: str):
        cli = evaluate.main(common + ["--recalibrate_batches", batches, "--trainer.logger.init_args.name", name])
        log_dir = Path(cli.trainer.log_dir)
        after = _running_stats(tl.save_task(cli.model.model, "shapes", tmp_path / f"{name}.safetensors"))
        with open(log_dir / "report.csv") as f:
            norm_images = {r["task"]: r["norm_images"] for r in csv.DictReader(f)}
        return after, norm_images, (log_dir / "report.md").read_text()

    after, norm_images, text = evaluated("0", "stored")
    assert after.keys() == stored.keys()
    for key, value in stored.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert norm_images["shapes"] == "0"
    assert "Norm statistics: as stored with the weights, not re-estimated here" in text
    # the contrast: 2 batches of 4 of the 9 training images re-estimate them, and the report says so
    after, norm_images, text = evaluated("2", "two")
    assert any(not torch.equal(after[k], stored[k]) for k in stored)
    assert norm_images["shapes"] == "8"
    assert "re-estimated for these weights on 8 training images per task" in text


def test_predict_pads_the_rows_of_a_task_with_fewer_classes_than_top_k(tmp_path, monkeypatch):
    """3 classes, ``--top_k 5``: each row has path, task, 3 (label, probability) pairs holding every
    class once with probabilities summing to 1, then 2 empty pairs; the header names 5 pairs."""
    monkeypatch.chdir(tmp_path)
    task_file = _shapes_task_file(tmp_path / "shapes.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    out = predict.main(["--model.backbone", "test_resnet", "--model.weights", "null", "--tasks_from", str(task_file),
                        "--images", str(images), "--top_k", "5", "--output", str(tmp_path / "p.csv"),
                        "--trainer.enable_progress_bar", "false"])
    with open(out) as f:
        header, *rows = list(csv.reader(f))
    assert header == ["path", "task"] + [f"{n}_{i}" for i in range(1, 6) for n in ("label", "probability")]
    assert len(rows) == 2
    for row in rows:
        assert len(row) == 2 + 2 * 5 and row[1] == "shapes"
        assert sorted(row[2:8:2]) == FOLDER_CLASSES
        assert sum(float(p) for p in row[3:8:2]) == pytest.approx(1, abs=1e-5)
        assert row[8:] == ["", "", "", ""]


@pytest.mark.slow
def test_a_lora_run_evaluates_and_predicts_from_its_task_files_as_fit_tested_it(in_tmp, tmp_path):
    """``fit --model.mode lora``: a report counting each task's LoRA, norms and head, one task file per
    task, counts (no layer-selection heatmap) in TensorBoard; its task files, given to evaluate without
    ``--model.mode`` (the files say what they are), give fit's own test numbers, and predict through
    the merged model equals the softmax of the LoRA model; a flag of another mode is refused before
    any folder is made."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _fit("lora", "[mnist, sketch]", "--model.mode", "lora", "--model.lora_rank", "4")
    log_dir = run.config.parent
    report = (log_dir / "report.md").read_text()
    assert "mode=lora, lora_rank=4, lora_alpha=4, lora_grouped_convs=frozen (test set)" in report
    model = TapsModule.load_from_checkpoint(run.ckpt, weights_only=True).model.eval()
    cost = model.task_cost("mnist")
    assert f"| mnist | {run.test_acc['mnist']:.2f} | {cost['active_layers']} / {cost['gated_layers']} | " \
           f"{cost['task_params']:,} |" in report
    assert sorted(p.name for p in run.adapters.iterdir()) == ["mnist.safetensors", "sketch.safetensors"]
    tags = {}
    for events in log_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for kind, names in accumulator.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
    assert {"taps/mnist/task_params", "taps/sketch/task_params_fraction"} <= tags["scalars"]
    assert not tags.get("images")
    accs, _ = _evaluate(TINY + ["--tasks_from", str(run.adapters), "--data.tasks", "[mnist, sketch]",
                                "--trainer.logger.init_args.name", "lora_eval"])
    assert accs == run.test_acc
    paths, wide = _digit_images(tmp_path / "images")
    with torch.no_grad():
        expected = model(_expected_inputs(paths, wide), "sketch").softmax(-1)
    rows = _read_predictions(predict.main(TINY + ["--tasks_from", str(run.adapters / "sketch.safetensors"),
                                                  "--images", str(tmp_path / "images"), "--top_k", "2",
                                                  "--output", str(tmp_path / "lora.csv")]))
    for i, path in enumerate(paths):
        labels, p = rows[(path.name, "sketch")]
        assert labels == [str(j) for j in expected[i].topk(2).indices.tolist()]
        assert p == pytest.approx(expected[i].topk(2).values.tolist(), abs=2e-6)
    before = sorted((in_tmp / "logs").rglob("*"))
    with pytest.raises(TapsError, match=r"--model.mode lora refuses flags it would not use:\n  - --model.lam 2.0"):
        _fit("lora_lam", "[mnist]", "--model.mode", "lora", "--model.lam", "2")
    assert sorted((in_tmp / "logs").rglob("*")) == before
