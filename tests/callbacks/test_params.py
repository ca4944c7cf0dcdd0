"""``TaskParamLogger`` (callbacks/params.py): the ``taps/<task>/*`` cost scalars a logger receives."""
import torch
from lightning.pytorch.loggers import Logger

from callbacks import TaskParamLogger
from helpers import TINY, TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``[(step, {name: value})]``."""

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def test_active_layers_scalar_counts_the_open_gates_not_the_gated_layers(tmp_path):
    """Three of task ``a``'s gates closed by hand, ``b``'s all open: the scalar is 15 - 3 and 15
    (test_resnet has 15 gated layers), while ``gated_layers`` would be 15 for both."""
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    layers = list(module.model.taps_layers())
    assert len(layers) == 15
    closed = {layers[i][0] for i in (0, 4, 9)}
    with torch.no_grad():
        for name, layer in layers:
            layer.taps_score["a"].fill_(0.05 if name in closed else 0.2)  # tau = 0.1
            layer.taps_score["b"].fill_(0.2)
    logger = MemoryLogger()
    trainer = taps_trainer(accelerator="cpu", logger=logger, default_root_dir=tmp_path, callbacks=[TaskParamLogger()],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    scalars = [m for _, m in logger.logged if "taps/a/active_layers" in m]
    assert len(scalars) == 1
    assert scalars[0]["taps/a/active_layers"] == 12.0
    assert scalars[0]["taps/b/active_layers"] == 15.0
