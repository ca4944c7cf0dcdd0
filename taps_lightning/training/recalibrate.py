"""Re-estimate a task's BatchNorm running statistics for the weights it has now.

TAPS gates switch whole deltas on or off. A BatchNorm's running statistics are an exponential
average over the last ~10 training steps (momentum 0.1), so when gates flip late in an epoch
the statistics still describe the old gate state and eval-mode accuracy collapses (a task can
read 24 % while batch-statistics accuracy is 94 %). :func:`recalibrate_norms` recomputes them
for the current weights: a train-mode forward of the task's norms over a few batches, no
gradient, each batch weighted equally (a cumulative average, ``momentum=None``), the "precise
BN" practice of pycls/fvcore.

Why not :func:`torch.optim.swa_utils.update_bn`: it resets and re-estimates *every* BatchNorm of
the model (the other tasks' copies included, which the forward of one task never reaches and
which it would leave at zero mean / unit variance), puts the whole model in train mode (dropout
and drop-path on), calls ``model(x)`` without a task, runs over the whole loader and has no
reduction across DDP ranks. Here only the task's own norms are in train mode and reset, the
rest of the model stays in eval mode, and ``reduce`` sums the statistics over ranks so every
rank ends with the same values. Plain PyTorch: usable in any loop.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.multitask import MultiTaskModel

__all__ = ["recalibrate_norms"]


@torch.no_grad()
def recalibrate_norms(model: MultiTaskModel, task: str, batches: Iterable[Tensor],
                      reduce: Callable[[Tensor], Tensor] | None = None) -> int:
    """Replace the running statistics of ``task``'s own BatchNorms by their average over ``batches``.

    Args:
        model: any :class:`~taps_lightning.MultiTaskModel` (TAPS, progressive adapters, baselines).
        task: the task whose norms are re-estimated (its images are ``batches``).
        batches: input tensors (already on the model's device), e.g. the task's training images
            under the evaluation transform; converted to the model's dtype, ``None`` entries skipped.
        reduce: sums a tensor over processes (DDP); ``None`` in a single process. Every process
            must call with its own shard of the batches (possibly none).

    Returns:
        The number of images the statistics were computed on (over all processes); 0 when the task
        has no BatchNorm of its own (LayerNorm/GroupNorm-only models, shared norms), in which case
        ``batches`` is not read and nothing changes.

    All or nothing: if any batch fails (a wrong shape, a batch of one image), every norm's running
    statistics, batch count, momentum and train/eval flag are restored as they were, and the error
    (with a note naming the batch) propagates.
    """
    norms = model.task_batchnorms(task)
    if not norms:
        return 0
    saved = [(norm.momentum, norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
             for norm in norms]
    modes = {module: module.training for module in model.modules()}
    previous_task = model.active_task
    dtype = _input_dtype(model)
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: every batch counts the same
        norm.train()
    seen, index = 0, -1
    try:
        for index, x in enumerate(batches):
            if x is None:  # a batch whose every image was skipped (skip_corrupt)
                continue
            if x.is_floating_point() and x.dtype != dtype:  # float32 images, a float64 or bf16 model
                x = x.to(dtype)
            model(x, task)
            seen += len(x)
        total = _average_over_processes(norms, seen, reduce)
        if total == 0:  # no images anywhere: keep what was there
            _restore(norms, saved)
        return total
    except BaseException as err:  # all or nothing: never statistics of the first batches only
        _restore(norms, saved)
        if isinstance(err, Exception):
            err.add_note(f"recalibrate_norms({task!r}) failed at batch {index}; the running statistics of the "
                         f"task's {len(norms)} BatchNorm(s) are restored as they were")
        raise
    finally:
        for norm, (momentum, *_) in zip(norms, saved):
            norm.momentum = momentum
        model.train(modes[model])  # recursive (TAPS layers drop their inference caches when switching)
        for module, training in modes.items():  # then any module that was in another mode than the root
            if module.training != training:
                module.training = training
        if previous_task is not None and previous_task != task:
            model.set_task(previous_task)


def _input_dtype(model: MultiTaskModel) -> torch.dtype:
    """The dtype inputs must have for ``model``: that of its floating-point weights (float64 under
    ``--trainer.precision 64-true``, bfloat16 under ``bf16-true``; under ``*-mixed`` the weights stay
    float32 and autocast converts inside)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _restore(norms: list[_BatchNorm], saved: list[tuple]) -> None:
    """Put back each norm's running statistics and batch count as :func:`recalibrate_norms` found them."""
    for norm, (_, mean, var, count) in zip(norms, saved):
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.num_batches_tracked.copy_(count)


def _average_over_processes(norms: list[_BatchNorm], images: int, reduce: Callable[[Tensor], Tensor] | None) -> int:
    """Turn each process's per-batch average into the average over every process's batches
    (weights: batches per process), with one collective for all norms and the image count;
    returns the images seen over all processes."""
    if reduce is None:
        return images
    counts = [norm.num_batches_tracked.to(norm.running_mean.dtype).reshape(1) for norm in norms]
    flat = torch.cat([torch.cat([norm.running_mean * n, norm.running_var * n, n])
                      for norm, n in zip(norms, counts)]).double()
    flat = reduce(torch.cat([flat, flat.new_tensor([float(images)])]))
    offset = 0
    for norm in norms:
        size = norm.running_mean.numel()
        mean, var = flat[offset:offset + size], flat[offset + size:offset + 2 * size]
        n = flat[offset + 2 * size]
        offset += 2 * size + 1
        if n > 0:
            norm.running_mean.copy_(mean / n)
            norm.running_var.copy_(var / n)
        norm.num_batches_tracked.fill_(int(n))
    return int(flat[offset])
