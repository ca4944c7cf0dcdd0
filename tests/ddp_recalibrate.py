"""Validate a TapsModule with 2 gloo processes on CPU, with BatchNorm re-estimation on 3 batches
per task (2 on rank 0, 1 on rank 1); each rank saves its task norms' statistics as
``ROOT_DIR/rank<r>.pt``.

Run by ``test_recalibrate.py::test_ddp_ranks_end_with_identical_statistics`` (Lightning relaunches
this script for rank 1). Usage: ``python tests/ddp_recalibrate.py ROOT_DIR``.
"""
import sys
from pathlib import Path

import lightning as L

from callbacks import NormRecalibration, lifecycle_callbacks
import torch

from helpers import TinyTasks
from taps_lightning.training.compose import create_taps_module


def main(root_dir: str) -> None:
    L.seed_everything(0)
    data = TinyTasks.make(n=24, batch_size=8)
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes, recalibrate_batches=3)
    trainer = L.Trainer(callbacks=lifecycle_callbacks(), accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root_dir)
    trainer.validate(module, data, verbose=False)
    stats = {f"{task}/{i}/{key}": getattr(norm, key).clone()
             for task in module.tasks for i, norm in enumerate(module.model.task_batchnorms(task))
             for key in ("running_mean", "running_var", "num_batches_tracked")}
    torch.save({"stats": stats, "images": NormRecalibration.of(trainer).images}, Path(root_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
