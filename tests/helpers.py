"""Small builders shared by the tests."""
import copy
import os
import time
import zlib
from pathlib import Path

import lightning as L
import timm
import torch
from torch import nn

import taps_lightning as tl


def randomize_tasks(model: tl.TapsModel, scale: float = 0.05,
                    off: tuple[str, ...] | dict[str, tuple[str, ...]] = ()) -> None:
    """Give every task random deltas, norms and scores; layers named in ``off`` get a score below tau
    (``off`` is one tuple for every task, or ``{task: names}`` for a gate pattern per task)."""
    with torch.no_grad():
        for name, layer in model.taps_layers():
            for task in layer.tasks:
                task_off = off.get(task, ()) if isinstance(off, dict) else off
                layer.taps_delta[task].normal_(0, scale)
                layer.taps_score[task].fill_(0.05 if name in task_off else 0.2)
        for _, norm in model.task_norms():
            for task_norm in norm.norms.values():
                for p in task_norm.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
                if hasattr(task_norm, "running_mean") and task_norm.running_mean is not None:
                    task_norm.running_mean.normal_(0, 0.1)
                    task_norm.running_var.uniform_(0.5, 1.5)


def explicit_task_network(model: tl.TapsModel, task: str) -> tuple[nn.Sequential, dict[str, nn.Parameter]]:
    """``task``'s network written out without TAPS code: a copy of the backbone in which each gated
    layer is its plain base layer with a new leaf weight ``w = w_base + I(s >= tau) * delta``
    (the gate compared here), each norm is the task's copy, followed by the task's head.
    Returns the network and ``{layer name: w}``, whose ``.grad`` is ``dL/dw`` after a backward."""
    net = copy.deepcopy(model.backbone)
    weights = {}
    for name in model.gated_names:
        wrapper = net.get_submodule(name)
        plain = wrapper.base_layer
        on = wrapper.taps_score[task].item() >= model.threshold
        weights[name] = nn.Parameter(plain.weight.detach() + (wrapper.taps_delta[task].detach() if on else 0))
        plain.weight = weights[name]
        _replace(net, name, plain)
    for name in model.norm_names:
        _replace(net, name, net.get_submodule(name).norms[task])
    return nn.Sequential(net, copy.deepcopy(model.heads[task])), weights


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def single_task_layer(module, threshold: float = 0.1) -> tl.TapsLayer:
    """``module`` wrapped by TAPS with one task ``"t"`` added and active (zero delta, score 0.15)."""
    layer = tl.create_taps_layer(module, tl.TapsConfig(threshold, 0.15))
    layer.add_task("t")
    layer.active_task = "t"
    return layer


def tiny_resnet(tasks=None, **kwargs) -> tl.TapsModel:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    return tl.TapsModel(backbone, tasks=tasks or {"a": 3, "b": 5}, **kwargs)


class TinyTasks:
    """Factory of a tiny, learnable multi-task DataModule (class = which quadrant is bright)."""

    @staticmethod
    def make(tasks=("a", "b"), classes=(4, 3), n=24, size=32, batch_size=8, nan_task=None):
        from datamodules.base import MultiTaskDataModule, TensorImageDataset

        class _Tiny(MultiTaskDataModule):
            @property
            def available_tasks(self):
                return dict(zip(tasks, classes))

            def build_dataset(self, task, split):
                g = torch.Generator().manual_seed(zlib.crc32(f"{task}/{split}".encode()))  # hash() varies per process
                k = self.available_tasks[task]
                labels = torch.arange(n) % k
                images = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
                half = size // 2
                for i, y in enumerate(labels.tolist()):
                    r, c = divmod(y % 4, 2)
                    images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
                transform = None
                if task == nan_task:
                    transform = lambda x: torch.full(x.shape, float("nan"))
                return TensorImageDataset(images, labels, transform)

        return _Tiny(batch_size=batch_size, num_workers=0, persistent_workers=False)



class PauseForSignal(L.Callback):
    """For subprocess runs (``--trainer.callbacks+=...``): stand still once, as a job waiting for its
    scheduler's signal. After batch ``batch`` of epoch ``epoch``, if ``marker`` does not exist yet,
    write the process id there and wait (up to ``timeout`` seconds) until Lightning has received
    SIGTERM. A resumed run finds the marker and goes on."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 0, timeout: float = 300.0) -> None:
        self.marker, self.epoch, self.batch, self.timeout = marker, epoch, batch, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.time() + self.timeout
        while not trainer.received_sigterm and time.time() < deadline:
            time.sleep(0.05)
