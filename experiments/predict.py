"""``python -m experiments.predict``: label new images with trained tasks, into a CSV.

The tasks come from ``--ckpt_path`` or ``--tasks_from`` exactly as in ``experiments.evaluate``;
``--images`` takes files, folders and globs. Each image gets, per task, the ``--top_k`` labels
and their softmax probabilities, one CSV row per image and task:
``path,task,label_1,probability_1,...,label_k,probability_k``. Labels are the class names stored
in the task file at export (else the DataModule's, else class indices). Images get the test
transform of the ``--data`` config (``eval_transform``), go through a DataLoader in batches of
``eval_batch_size`` with a progress bar, and by default through ``merge(model, task)`` (a plain
model per task, the fastest); ``--gated true`` runs the TAPS model itself. The CSV is written to a
temporary file in the same folder and renamed at the end, so an error leaves no partial file.
"""
from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from lightning.fabric import Fabric
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datamodules import CorruptImageError, MultiTaskDataModule
from datamodules.images import IMAGE_EXTENSIONS, load_rgb
from taps_lightning import merge
from taps_lightning.files.atomic import atomic_write, check_replaceable
from taps_lightning.training.compose import create_taps_module
from taps_lightning.errors import SettingsError, run_command

from .run.runs import check_writable
from .run.preemption import raise_on_sigterm
from .run.trained import TrainedCLI, expand_paths


class ImageFiles(Dataset):
    """Decoded, transformed images of ``paths``; an undecodable file is an error naming it."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        try:
            image = load_rgb(self.paths[index])
        except CorruptImageError as err:
            raise CorruptImageError(f"{self.paths[index]}: cannot decode image ({err.__cause__}); "
                                    "fix or remove it from --images") from err
        return self.transform(image)


class PredictCLI(TrainedCLI):
    writes_run_folder = False  # it writes one CSV (atomically), no run folder

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--images", type=str, nargs="+", default=None, help="image files, folders or globs")
        parser.add_argument("--tasks", type=str, nargs="+", default=None, help="tasks to predict with (default: all)")
        parser.add_argument("--top_k", type=int, default=5, help="labels per image and task")
        parser.add_argument("--output", type=str, default="predictions.csv", help="the CSV to write")
        parser.add_argument("--gated", type=bool, default=False, help="run the gated TAPS model instead of merge()")

    def before_instantiate_classes(self) -> None:
        """Check every input before anything is built."""
        super().before_instantiate_classes()
        cfg = self.config
        if not cfg.images:
            raise SettingsError("--images: give image files, folders or globs to predict")
        if cfg.top_k < 1:
            raise SettingsError(f"--top_k must be >= 1, got {cfg.top_k}")
        check_replaceable(cfg.output, "the predictions CSV", "--output")  # a folder, device, FIFO: refused
        check_writable(Path(cfg.output).absolute().parent, "--output", "--output")  # before any image is read
        self.images = expand_paths(cfg.images, IMAGE_EXTENSIONS, "--images")
        self.tasks = self.trained.select(cfg.tasks)

    def instantiate_classes(self) -> None:
        """The DataModule (for its transforms and class names; no data is read) and the model;
        no Trainer: prediction is a plain loop on one device."""
        self.datamodule = instantiate_class((), self.config.data.as_dict())
        self.model = self.trained.build_module(self.config.model)
        self.trainer = None


def _fabric(trainer_cfg) -> Fabric:
    """One device and the precision of ``--trainer.accelerator/--trainer.precision``."""
    devices = 1 if trainer_cfg.devices == "auto" else trainer_cfg.devices
    fabric = Fabric(accelerator=trainer_cfg.accelerator, devices=devices, precision=trainer_cfg.precision)
    if fabric.world_size != 1:
        raise SettingsError(f"predict runs in one process on one device; got --trainer.devices {trainer_cfg.devices}")
    return fabric


@torch.inference_mode()
def predict_task(net: Callable[[Tensor], Tensor], loader: DataLoader, device: torch.device, top_k: int,
                 desc: str, progress: bool = True) -> tuple[Tensor, Tensor]:
    """``(probabilities [N, k], class indices [N, k])`` of the ``top_k`` classes of every image."""
    probs, labels = [], []
    for images in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        if images is None:  # a batch whose every image was skipped
            continue
        top = net(images.to(device)).float().softmax(-1)
        top = top.topk(min(top_k, top.shape[-1]), dim=-1)
        probs.append(top.values.cpu())
        labels.append(top.indices.cpu())
    return torch.cat(probs), torch.cat(labels)


#: What a spreadsheet reads as the start of a formula (OWASP's CSV-injection list).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """``value`` as a CSV text cell that a spreadsheet shows as text: a class name, task or path
    starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``
    (opened in Excel or LibreOffice, ``=HYPERLINK(...)`` would otherwise run as a formula)."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def csv_rows(images: Sequence[Path], results: dict[str, tuple[Tensor, Tensor, list[str] | None]],
             top_k: int) -> list[list[str]]:
    """One row per image and task: path, task, then label and probability of each of the top ``top_k``
    (text cells escaped by :func:`csv_text`)."""
    rows = []
    for i, path in enumerate(images):
        for task, (probs, labels, names) in results.items():
            row = [csv_text(str(path)), csv_text(task)]
            for label, prob in zip(labels[i].tolist(), probs[i].tolist()):
                row += [csv_text(names[label]) if names else str(label), f"{prob:.6g}"]
            rows.append(row + [""] * (2 + 2 * top_k - len(row)))  # a task with fewer classes than top_k
    return rows


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write whole or not at all (:func:`~taps_lightning.files.atomic.atomic_write`): readers never see
    half a file, and a device, FIFO or folder at ``path`` is refused, never replaced."""
    atomic_write(path, lambda f: csv.writer(f).writerows([header, *rows]), "the predictions CSV", "--output",
                 text=True)


def main(args: list[str] | None = None) -> Path:
    with raise_on_sigterm("nothing was written (the CSV is written whole at the end, or not at all)"):
        return _predict(args)


def _predict(args: list[str] | None) -> Path:
    cli = PredictCLI(create_taps_module, MultiTaskDataModule, subclass_mode_data=True, run=False, args=args,
                     seed_everything_default=0, save_config_callback=None)
    cfg, model, data = cli.config, cli.model.model, cli.datamodule
    fabric = _fabric(cfg.trainer)
    gated = cfg.gated or not model.can_export  # task-file models also merge
    if not cfg.gated and gated:
        rank_zero_info(f"TAPS | mode {cli.model.hparams.mode}: no merge() for this model, predicting with it as trained")
    if gated:
        gated_model = fabric.setup_module(model)  # on the device, inputs and forward in --trainer.precision
    results = {}
    for task in cli.tasks:
        names = cli.trained.class_names(task, data)
        if names is None:
            rank_zero_info(f"TAPS | {task}: no class names in {cli.trained.origin(task)} or --data; labels are class indices")
        net = partial(gated_model, task=task) if gated else fabric.setup_module(merge(model, task).eval())
        loader = DataLoader(ImageFiles(cli.images, data.eval_transform(task)), batch_size=data.eval_batch_size,
                            num_workers=data.num_workers, pin_memory=fabric.device.type == "cuda")
        probs, labels = predict_task(net, loader, fabric.device, cfg.top_k, desc=task,
                                     progress=cfg.trainer.enable_progress_bar is not False)
        results[task] = probs, labels, names
        del net  # one merged copy at a time
    output = Path(cfg.output)
    header = ["path", "task", *[f"{n}_{i}" for i in range(1, cfg.top_k + 1) for n in ("label", "probability")]]
    write_csv(output, header, csv_rows(cli.images, results, cfg.top_k))
    rank_zero_info(f"TAPS | {len(cli.images)} images x {len(results)} tasks -> {output} "
                   f"({'gated model' if gated else 'merged models'}, top {cfg.top_k})")
    return output


if __name__ == "__main__":
    run_command(main)  # the error boundary: a user error is its message and exit status 2, no traceback
