"""What ``experiments.evaluate`` and ``experiments.predict`` share: fit's command line (same
flags, defaults and ``--config`` files) and the trained tasks to use, from a checkpoint
(``--ckpt_path``) or from task files loaded onto the base that ``--model.*`` builds
(``--tasks_from``, :func:`taps_lightning.load_task`, which refuses another backbone or base).
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_info

from datamodules import DataLayoutError, MultiTaskDataModule
from taps_lightning import TaskFileError, load_task, task_metadata
from taps_lightning.files.export import TASK_FORMATS, checked_metadata
from taps_lightning.errors import CheckpointError, SettingsError
from taps_lightning.training.compose import create_taps_module, flag_defaults, module_flags
from taps_lightning.training.lightning_module import TapsModule
from taps_lightning.training.modes import mode_class

from .cli import TapsCLI
from .runs import read_checkpoint

__all__ = ["TrainedCLI", "TrainedTasks", "expand_paths"]

#: ``--model`` flags a checkpoint's hyper-parameters set (the tasks come from the checkpoint itself).
_MODULE_ARGS = set(flag_defaults()) - {"tasks"}


def expand_paths(patterns: Sequence[str], suffixes: Sequence[str], flag: str) -> list[Path]:
    """The files ``patterns`` name, in order and without repeats: a file as is, a folder's files
    ending in ``suffixes`` (not recursive) and a glob's matches ending in ``suffixes`` (``**``
    recurses). A path that exists is taken literally, even with ``[``, ``*`` or ``?`` in its name
    (``a[1].png`` is a file, not a pattern). Each file is counted once, by its resolved path, so a
    symlink loop (``d/loop -> .`` under ``d/**``) or a file named twice gives one entry. A missing
    path, an empty folder or a glob matching nothing is a :class:`SettingsError` naming it."""
    def wanted(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in suffixes

    paths: dict[Path, Path] = {}  # resolved -> as found (the first spelling is kept)
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if wanted(p))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(pattern):
            found = [p for p in map(Path, sorted(glob.glob(pattern, recursive=True))) if wanted(p)]
        else:
            raise SettingsError(f"{flag}: {pattern}: no such file or folder")
        if not found:
            raise SettingsError(f"{flag}: {pattern}: matches no {'/'.join(suffixes)} file")
        for p in found:
            paths.setdefault(p.resolve(), p)
    return list(paths.values())


@dataclass
class TrainedTasks:
    """The trained tasks (``{task: num_classes}``) and where they come from: one checkpoint, or
    one task file per task (with the class names stored at export, when known)."""

    num_classes: dict[str, int]
    checkpoint: Path | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    stored_class_names: dict[str, list[str] | None] = field(default_factory=dict)
    #: The task files' formats (``taps-task/1``, ``lora-task/1``), and a LoRA file's settings.
    formats: dict[str, str] = field(default_factory=dict)
    lora_settings: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "TrainedTasks":
        path = Path(path)
        checkpoint = read_checkpoint(path)
        hparams = module_flags(checkpoint.get("hyper_parameters") or {}, f"--ckpt_path: {path}")  # types checked
        if not isinstance(hparams.get("tasks"), dict) or "backbone" not in hparams:
            raise CheckpointError(f"--ckpt_path: {path}: no TapsModule hyper-parameters (backbone, tasks) in it; "
                             "give a checkpoint written by experiments.fit")
        names = checkpoint.get("taps_class_names")  # recorded by fit: the labels as trained
        names = names if isinstance(names, dict) else {}
        return cls(num_classes=dict(hparams["tasks"]), checkpoint=path, hparams=hparams,
                   stored_class_names={t: names.get(t) for t in hparams["tasks"]})

    @classmethod
    def from_files(cls, patterns: Sequence[str]) -> "TrainedTasks":
        trained = cls(num_classes={})
        for path in expand_paths(patterns, (".safetensors",), "--tasks_from"):
            meta = task_metadata(path)
            if "task" not in meta or "num_classes" not in meta:
                raise TaskFileError(f"{path}: not a task file (no task name in its metadata); "
                                    "export tasks with taps_lightning.save_task")
            task = meta["task"]
            if task in trained.files:
                raise SettingsError(f"--tasks_from: {trained.files[task]} and {path} both hold task {task!r}; "
                                 "pass one file per task")
            trained.files[task], trained.num_classes[task] = path, int(meta["num_classes"])
            trained.stored_class_names[task] = meta["class_names"]
            trained.formats[task] = meta.get("format", "")
            if trained.formats[task] == TASK_FORMATS["lora"]:
                raw = {k: v for k, v in meta.items() if k != "class_names"}  # task_metadata decoded these
                parsed = checked_metadata(path, raw, ("lora_rank", "lora_alpha", "lora_grouped_convs"))
                trained.lora_settings[task] = (parsed["lora_rank"], parsed["lora_alpha"], parsed["lora_grouped_convs"])
        kinds = sorted(set(trained.formats.values()))
        if len(kinds) > 1:
            raise SettingsError("--tasks_from: the files are of different kinds (" + ", ".join(
                f"{trained.files[t]}: {f}" for t, f in trained.formats.items()) + "); load one kind at a time")
        return trained

    def origin(self, task: str | None = None) -> str:
        """Where ``task`` (or every task) comes from, for messages."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        return str(self.files[task]) if task else "the --tasks_from files (" + ", ".join(map(str, self.files.values())) + ")"

    def configure_model(self, model_cfg) -> None:
        """Set ``--model.*`` for these tasks. From a checkpoint: its hyper-parameters (as
        LightningCLI does for ``--ckpt_path``), with no weights file, since the checkpoint holds
        every weight. From task files: the base is ``--model.*``'s; TAPS files need a TAPS mode, LoRA
        files set the lora mode and its settings."""
        if self.checkpoint is not None:
            for key in _MODULE_ARGS & self.hparams.keys():
                model_cfg[key] = self.hparams[key]
            model_cfg.pretrained, model_cfg.weights, model_cfg.weights_sha256 = False, None, None
        elif self.lora_settings:
            self._configure_lora(model_cfg)
        elif not mode_class(model_cfg.mode).learns_gates:
            raise SettingsError(f"--tasks_from loads TAPS task files, but --model.mode is {model_cfg.mode!r}; "
                             "use the default (incremental), or --ckpt_path for a baseline or progressive run")
        if model_cfg.mode == "memory_efficient":
            model_cfg.joint_epochs = 0  # evaluate the tasks as trained (TAPS on), not the joint warm-up phase

    def _configure_lora(self, model_cfg) -> None:
        """LoRA files: ``--model.mode lora`` (what the files are, whatever the flag says) with the files'
        rank, alpha and grouped-convolution variant (all files must agree; the base is still ``--model.*``'s)."""
        model_cfg.mode = "lora"
        settings = set(self.lora_settings.values())
        if len(settings) > 1:
            raise SettingsError("--tasks_from: the LoRA files differ in rank, alpha or grouped convolutions (" + "; ".join(
                f"{self.files[t]}: rank {r}, alpha {a}, {g}" for t, (r, a, g) in self.lora_settings.items())
                + "); load files trained with the same settings together")
        model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_grouped_convs = settings.pop()

    def select(self, tasks: Sequence[str] | None) -> list[str]:
        """``tasks`` (default: all), each checked to be one of these tasks."""
        if not tasks:
            return list(self.num_classes)
        unknown = [t for t in tasks if t not in self.num_classes]
        if unknown:
            raise SettingsError(f"--tasks: {unknown} not in {self.origin()}, which holds {list(self.num_classes)}")
        return list(dict.fromkeys(tasks))

    def check_data(self, data_classes: dict[str, int]) -> None:
        """The DataModule must give every task as many classes as its trained head has."""
        for task, n in self.num_classes.items():
            if data_classes.get(task) != n:
                raise SettingsError(f"{self.origin(task)}: task {task!r} has {n} classes, but --data gives "
                                 f"{data_classes.get(task)}; use the data the task was trained on "
                                 "(e.g. --config <run folder>/config.yaml)")

    def load_into(self, module: TapsModule) -> None:
        """Load the task files onto ``module``'s base (``load_task`` refuses a mismatch)."""
        for path in self.files.values():
            load_task(module.model, path)

    def build_module(self, model_cfg) -> TapsModule:
        """A ``TapsModule`` holding the trained tasks, in eval mode (for use outside a Trainer)."""
        kwargs = {k: v for k, v in model_cfg.as_dict().items() if k in _MODULE_ARGS}
        module = create_taps_module(**kwargs, tasks=self.num_classes)
        if self.checkpoint is not None:
            module.load_state_dict(read_checkpoint(self.checkpoint)["state_dict"])
        else:
            self.load_into(module)
        return module.eval()

    def class_names(self, task: str, datamodule: MultiTaskDataModule) -> list[str] | None:
        """Label names of ``task``: stored in its task file, else from the DataModule, else ``None``."""
        names = self.stored_class_names.get(task)
        if names is None:
            try:
                names = datamodule.class_names(task)
            except DataLayoutError:  # the data is not on this machine: predictions are still possible
                names = None
        return names if names is not None and len(names) == self.num_classes[task] else None


class TrainedCLI(TapsCLI):
    """fit's CLI for trained tasks: exactly one of ``--ckpt_path`` (a checkpoint to use) and
    ``--tasks_from`` (task files for the base ``--model.backbone/--model.weights`` builds)."""

    trained: TrainedTasks

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--tasks_from", type=str, nargs="+", default=None,
                            help="task files (.safetensors), folders of them or globs, loaded onto the --model base")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        if cfg.ckpt_path == "last":
            raise SettingsError("--ckpt_path last resumes training (experiments.fit); give the path of a .ckpt, "
                             "e.g. logs/taps/version_0/checkpoints/best-03.ckpt")
        if (cfg.ckpt_path is None) == (cfg.tasks_from is None):
            raise SettingsError("give either --ckpt_path PATH.ckpt (a checkpoint of experiments.fit) or "
                             "--tasks_from FILES (task .safetensors files, e.g. <run>/checkpoints/adapters/*.safetensors)")
        self.trained = (TrainedTasks.from_checkpoint(cfg.ckpt_path) if cfg.ckpt_path
                        else TrainedTasks.from_files(cfg.tasks_from))
        self.trained.configure_model(cfg.model)
        super().before_instantiate_classes()
        rank_zero_info(f"TAPS | tasks {list(self.trained.num_classes)} from {self.trained.origin()} "
                       f"(backbone={cfg.model.backbone} mode={cfg.model.mode})")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except SettingsError as err:
            if self.trained.checkpoint is None:
                raise
            # the settings came from the checkpoint, not from flags the user gave (or could change here)
            raise CheckpointError(f"--ckpt_path: {self.trained.checkpoint}: the settings recorded in it are refused "
                                  f"(the file was edited, or written by another version; the --model names below are "
                                  f"its hyper-parameters): {err}") from None
