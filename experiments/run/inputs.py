"""Checks of what a user names on the command line that fit, evaluate and predict share, each
refused with a plain message (no traceback) that names the flag or file and the fix.

* :func:`check_data_flags`, before any folder is claimed: loader sizes and image sizes in range.
* :func:`check_against_data`, once the data module exists: task names that the adapter files can
  carry, and the class names recorded with the trained tasks (a checkpoint's, a task file's)
  against those of the data now (a renamed class folder would shift every label after it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from datamodules.embedded import environment_problems
from taps_lightning.files.atomic import temporary_name
from taps_lightning.training.checks import class_name_changes, data_class_names
from taps_lightning.errors import CheckpointError, SettingsError
from taps_lightning.models.multitask import TASK_NAME

from .runs import read_checkpoint

__all__ = ["check_data_flags", "check_run_length", "precision_problem", "check_against_data", "data_flag_problems", "task_classes",
           "MAX_IMAGE_SIZE"]

#: Largest image side accepted (``image_size``, ``resize_to``): a batch of 32 RGB float images of
#: 4096 x 4096 already takes 6 GiB before the network; 10000 px grew past 9 GB before anything failed.
MAX_IMAGE_SIZE = 4096
MIN_IMAGE_SIZE = 8


def data_flag_problems(init_args: dict) -> list[str]:
    """Out-of-range data settings in ``init_args`` (a DataModule's arguments), each naming its flag."""
    problems = []

    def flag(name: str) -> str:
        return f"--data.init_args.{name}"

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name in ("batch_size", "eval_batch_size"):
        value = init_args.get(name)
        optional = value is None and name == "eval_batch_size"  # null: the training batch size
        if name in init_args and not optional and not (is_int(value) and value >= 1):
            problems.append(f"{flag(name)} must be an integer >= 1 (images per task per step), got {value!r}")
    if "num_workers" in init_args and not (is_int(init_args["num_workers"]) and init_args["num_workers"] >= 0):
        problems.append(f"{flag('num_workers')} must be an integer >= 0 (0: load in the main process), "
                        f"got {init_args['num_workers']!r}")
    value = init_args.get("max_train_per_task")
    if value is not None and not (is_int(value) and value >= 1):
        problems.append(f"{flag('max_train_per_task')} must be an integer >= 1, or null for every image, got {value!r}")
    for name in ("image_size", "resize_to"):
        value = init_args.get(name)
        if name in init_args and not (is_int(value) and MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE):
            problems.append(f"{flag(name)} must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (pixels per "
                            f"side; the paper uses 224), got {value!r}")
    return problems


def precision_problem(precision) -> str | None:
    """Why ``--trainer.precision`` cannot run here, or ``None``. Every value Lightning offers runs end to
    end on CPU and GPU (fit, evaluate, predict, export, merge: inputs reach the model in its dtype, task
    files are float32 whatever trained them), except Transformer Engine's, which need NVIDIA's
    ``transformer_engine`` package and a CUDA GPU; they are refused here, before anything is built,
    instead of by a traceback from Lightning's connector."""
    if precision is None:
        return None
    value = str(precision)
    if value.startswith("transformer-engine"):
        import importlib.util

        import torch

        if importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available():
            return (f"--trainer.precision {value} needs NVIDIA Transformer Engine (the transformer_engine package) "
                    "and a CUDA GPU, which this machine lacks; use --trainer.precision bf16-mixed (or 16-mixed, "
                    "32-true)")
    return None


def check_data_flags(data_cfg, model_cfg=None, trainer_cfg=None) -> None:
    """Refuse out-of-range ``--data.init_args.*`` (and a ``--model.weights`` that is no file, and a
    ``--trainer.precision`` that cannot run here) before anything is built or claimed."""
    init_args = getattr(data_cfg, "init_args", None)
    values = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
    problems = data_flag_problems(values)
    precision = precision_problem(getattr(trainer_cfg, "precision", None))
    if precision:
        problems.append(precision)
    problems += environment_problems()  # TAPS_DATA_HOME a file: refused now, not after the data is built
    weights = getattr(model_cfg, "weights", None)
    if weights not in (None, "embedded") and not Path(weights).is_file():
        problems.append(f"--model.weights {weights}: " + ("is a folder" if Path(weights).is_dir() else "no such file")
                        + "; give a local .pth/.safetensors file (or null for random weights, with "
                        "--model.pretrained true for timm's hub weights)")
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))


def check_config_order(configs) -> None:
    """Refuse an experiment file of ``configs/<benchmark>/`` given without that folder's
    ``base.yaml`` before it: alone it would run the offline defaults with a few settings changed."""
    given = [Path(str(c)).resolve() for c in (configs or [])]
    for i, path in enumerate(given):
        base = path.parent / "base.yaml"
        if path.name != "base.yaml" and base.is_file() and base not in given[:i]:
            raise SettingsError(f"{path} overrides {base}, which was not given before it; alone it would run the "
                                f"offline defaults with a few settings changed. Pass --config {base} "
                                f"--config {path} (docs/cli.md)")


def task_classes(num_classes: dict[str, int]) -> dict[str, int]:
    """``--model.tasks`` from the data's ``{task: num_classes}``, once the data module exists and
    before the model does: a task name the model cannot hold (a folder name with a space, a dot,
    ...) is refused naming the folder's task, instead of a traceback from the model."""
    bad = [t for t in num_classes if not isinstance(t, str) or not TASK_NAME.match(t)]
    if bad:
        raise SettingsError(f"task name(s) {bad[:5]} (from the data's task folders or --data.init_args.tasks) may use "
                         "only letters, digits, '_' and '-': they name heads, adapter files and logged metrics. "
                         "Rename the folder(s), e.g. " + ", ".join(f"{t!r} -> {_suggest(t)!r}" for t in bad[:3]))
    return num_classes


def _suggest(task) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", str(task)).strip("_") or "task"


def _longest_name(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_task_names(tasks, adapter_folder: Path) -> None:
    """Each task's adapter (``<task>.safetensors``, written through ``.<task>.safetensors.<pid>.tmp``)
    must be a valid file name: refuse a task name that is too long before training, not at export."""
    existing = Path(adapter_folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    limit = _longest_name(existing)
    too_long = [t for t in tasks if len(os.fsencode(temporary_name(Path(f"{t}.safetensors")).name)) > limit]
    if too_long:
        shown = ", ".join(repr(t[:40] + "...") for t in too_long[:3])
        raise SettingsError(f"task name(s) {shown} too long: the adapter file <task>.safetensors (and its temporary file) "
                         f"would exceed this file system's {limit}-byte file names. Rename the task folder(s) to "
                         f"at most {limit - 30} bytes")


def check_against_data(cli) -> None:
    """Once ``cli`` has its data module: task names fit the adapter files, and the class names
    recorded with the trained tasks are those of the data."""
    data, cfg = cli.datamodule, cli.config
    tasks = list(getattr(data, "tasks", None) or [])
    trained = getattr(cli, "trained", None)
    if trained is None and getattr(cli, "trainer", None) is not None:  # fit exports <task>.safetensors
        log_dir = getattr(cli.trainer.logger, "log_dir", None)
        check_task_names(tasks, Path(cfg.checkpoint.dirpath or Path(log_dir or ".") / "checkpoints") / "adapters")
    if trained is not None:  # evaluate / predict: names from the task files or the checkpoint
        recorded, origin = trained.stored_class_names, trained.origin()
    elif cfg.ckpt_path:
        checkpoint = cli.resumed_checkpoint or read_checkpoint(cfg.ckpt_path)  # fit read it once already
        recorded, origin = checkpoint.get("taps_class_names") or {}, str(cfg.ckpt_path)
    else:
        return
    changes = class_name_changes({t: n for t, n in recorded.items() if t in tasks}, data_class_names(data, tasks),
                                 origin)
    if changes:
        raise CheckpointError(changes)


def check_run_length(trainer_cfg, model_cfg=None) -> None:
    """Refuse a run that would train nothing (``--trainer.max_epochs 0``, ``--trainer.max_steps 0``)
    or never end (``-1`` epochs with no step or time limit), before any folder is claimed."""
    epochs, steps, limit = (getattr(trainer_cfg, k, None) for k in ("max_epochs", "max_steps", "max_time"))
    problems = []
    if isinstance(epochs, int) and (epochs == 0 or epochs < -1):
        problems.append(f"--trainer.max_epochs must be >= 1, or -1 with --trainer.max_steps or --trainer.max_time for "
                        f"a run of that length; got {epochs}, which trains nothing")
    if isinstance(steps, int) and (steps == 0 or steps < -1):
        problems.append(f"--trainer.max_steps must be >= 1 (or -1: no step limit), got {steps}, which trains nothing")
    if epochs == -1 and steps in (None, -1) and limit is None:
        problems.append("--trainer.max_epochs -1 with no --trainer.max_steps or --trainer.max_time never ends; "
                        "give one of them, or --trainer.max_epochs N")
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))
