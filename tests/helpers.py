"""Small builders shared by the tests, and the rounding-aware comparison of reductions."""
import copy
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

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


def two_task_taps_layer(threshold: float = 0.1) -> tl.TapsLayer:
    """A TAPS Conv2d(3, 4, 3) with tasks ``a`` and ``b``, each with its own random delta (seeded),
    every gate open (score 0.15)."""
    torch.manual_seed(0)
    layer = tl.create_taps_layer(nn.Conv2d(3, 4, 3), tl.TapsConfig(threshold=threshold, score_init=0.15))
    for task in ("a", "b"):
        layer.add_task(task)
    with torch.no_grad():
        layer.taps_delta["a"].copy_(torch.randn_like(layer.taps_delta["a"]))
        layer.taps_delta["b"].copy_(torch.randn_like(layer.taps_delta["b"]))
    return layer


def seeded_timm_model(name: str, kwargs: dict, **extra) -> nn.Module:
    """timm's ``name`` with random weights drawn after ``torch.manual_seed(0)`` (nothing downloaded)."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs, **extra)


def tiny_resnet(tasks=None, **kwargs) -> tl.TapsModel:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    return tl.TapsModel(backbone, tasks=tasks or {"a": 3, "b": 5}, **kwargs)


class TinyTasks:
    """Factory of a tiny, learnable multi-task DataModule (class = which quadrant is bright)."""

    @staticmethod
    def make(tasks=("a", "b"), classes=(4, 3), n=24, size=32, batch_size=8, nan_task=None):
        """``n`` samples per task and split (or ``{task: n}``), labels ``0, 1, ..., k-1, 0, 1, ...``."""
        from datamodules.base import MultiTaskDataModule, TensorImageDataset

        class _Tiny(MultiTaskDataModule):
            @property
            def available_tasks(self):
                return dict(zip(tasks, classes))

            def build_dataset(self, task, split):
                g = torch.Generator().manual_seed(zlib.crc32(f"{task}/{split}".encode()))  # hash() varies per process
                k = self.available_tasks[task]
                count = n[task] if isinstance(n, dict) else n
                labels = torch.arange(count) % k
                images = torch.randint(0, 60, (count, 3, size, size), generator=g, dtype=torch.uint8)
                half = size // 2
                for i, y in enumerate(labels.tolist()):
                    r, c = divmod(y % 4, 2)
                    images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
                transform = None
                if task == nan_task:
                    transform = lambda x: torch.full(x.shape, float("nan"))
                return TensorImageDataset(images, labels, transform)

        return _Tiny(batch_size=batch_size, num_workers=0, persistent_workers=False)



#: The repository root (``experiments``, ``configs`` and ``tests`` live there).
ROOT = Path(__file__).resolve().parents[1]
#: A TapsModule small enough for a test: timm's random ``test_resnet``, a learning rate that moves
#: it in a few steps, and the sparsity penalty from the first epoch.
TINY = dict(backbone="test_resnet", lr=0.05, sparsity_warmup_epochs=0)


def cpu_trainer(tmp_path, **kw) -> L.Trainer:
    """A quiet, deterministic one-process CPU ``Trainer`` (2 epochs, no logger, no checkpoints,
    no sanity validation) with the lifecycle callbacks, as a user builds one (``callbacks`` are
    added after them); ``kw`` overrides any of it."""
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tmp_path, deterministic=True)
    args.update(kw)
    return taps_trainer(**args)


def taps_trainer(recalibrate_batches: int | None = None, **kw) -> L.Trainer:
    """``L.Trainer(**kw)`` with the lifecycle callbacks first (``callbacks.lifecycle_callbacks``), as
    a user builds a Trainer for a ``TapsModule``; ``callbacks`` given in ``kw`` come after them."""
    from callbacks import lifecycle_callbacks

    given = kw.pop("callbacks", None) or []
    return L.Trainer(**kw, callbacks=[*lifecycle_callbacks(recalibrate_batches),
                                      *(given if isinstance(given, list) else [given])])


#: ``experiments.fit`` flags for a short run: one epoch on 48 images per task, one batch of each evaluation.
QUICK = ["--trainer.max_epochs", "1", "--data.max_train_per_task", "48", "--data.batch_size", "16",
         "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]


def run_fit_cli(args, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    """``python -m experiments.fit ARGS`` in ``tmp_path`` (data under ``tmp_path/data``), output captured."""
    env = {**os.environ, "TAPS_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.fit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


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


# -- comparing reductions ------------------------------------------------------------------------
# A sum of n products computed in another order (another thread count, vector width or kernel)
# differs in its last bits, and cancellation can make the result 1000x smaller than what was
# added, so no tolerance relative to the result is safe. Whatever the order, the error of a sum
# of n products is at most gamma_n = n u / (1 - n u) times the sum of their absolute values
# (u = eps / 2 of the dtype; Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The
# tests compare a computed reduction with its float64 value and allow exactly that bound.

def exact_and_magnitude(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` on float64 copies of ``tensors`` (the exact value, to float64's 1e-16) and on their
    absolute values (the sum of the |products| it adds up). ``fn`` must be multilinear: sums of
    products (conv, linear, matmul, dot, sum), no non-linearity."""
    exact = fn(*(t.detach().double() for t in tensors))
    magnitude = fn(*(t.detach().double().abs() for t in tensors))
    return exact, magnitude


def assert_rounding_close(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor | float, terms: int,
                          msg: str = "", dtype: torch.dtype | None = None) -> None:
    """``|got - exact| <= gamma_terms * magnitude`` elementwise, with ``u`` of ``dtype`` (default
    ``got``'s): ``got`` is the float64 ``exact`` up to the rounding of sums whose products add up
    to ``magnitude`` in absolute value, ``terms`` the roundings one product can meet on its way
    (the lengths of the chained sums, plus one per rounded operand), in any order."""
    got = got.detach()
    u = torch.finfo(dtype or got.dtype).eps / 2
    gamma = terms * u / (1 - terms * u)
    err = (got.double() - exact.double()).abs()
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64).expand_as(err)
    bad = err > gamma * magnitude
    if bool(bad.any()):
        ratio = float((err / (u * magnitude).clamp_min(1e-300)).max())
        raise AssertionError(
            f"{msg + ': ' if msg else ''}{int(bad.sum())} of {bad.numel()} element(s) differ from the exact value by "
            f"more than gamma_{terms} x the sum of |terms| (worst: {ratio:.3g} u x it, u = {u:.3g}); "
            f"got {got.reshape(-1)[:4].tolist()}, exact {exact.reshape(-1)[:4].tolist()}")
