"""Validate and test a TapsModule with 2 gloo processes on CPU, then print from rank 0 how many
samples each task's accuracy metric counted over both ranks, as ``COUNTS {json}``.

Run by ``tests/experiments/test_ddp.py::test_ddp_evaluation_counts_every_sample_once`` (Lightning relaunches
this script for rank 1). Usage: ``python tests/ddp_eval_counts.py N_SAMPLES ROOT_DIR``.
"""
import json
import sys

import lightning as L

from callbacks import lifecycle_callbacks

from helpers import TinyTasks
from taps_lightning.training.compose import create_taps_module


class CountSamples(L.Callback):
    """Reads the metrics' state before ``TapsModule`` computes and resets them (callback hooks
    run before the module's): with micro accuracy every sample is a true positive or a false
    negative of its class, so ``tp + fn`` is the number of samples the metric saw."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _count(self, trainer, metrics, stage: str) -> None:
        for task, metric in metrics.items():
            local = (metric.tp + metric.fn).sum().float()
            self.counts[f"{stage}/{task}"] = int(trainer.strategy.reduce(local, reduce_op="sum"))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._count(trainer, pl_module.val_acc, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._count(trainer, pl_module.test_acc, "test")


def main(n_samples: int, root_dir: str) -> None:
    L.seed_everything(0)
    data = TinyTasks.make(n=n_samples, batch_size=4)
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes)
    counter = CountSamples()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root_dir,
                        callbacks=[*lifecycle_callbacks(), counter])
    trainer.validate(module, data)
    trainer.test(module, data)
    if trainer.is_global_zero:
        print("COUNTS " + json.dumps(counter.counts), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
