"""What a task costs: its sparsity penalty, which layers it adapts and how many weights it adds."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .gate import gate_open
from .model import TapsModel

__all__ = ["sparsity_loss", "gate_states", "layer_scores", "count_params", "total_params_multiple"]


def sparsity_loss(model: TapsModel, task: str, divisor: float | None = None) -> Tensor:
    """``(1/L) * sum_i |s_i|`` over ``task``'s scores, ``L`` = number of gated layers.

    Multiply by ``lambda`` for the paper's penalty (Eq. 3). Differentiable in the scores.
    ``divisor`` replaces ``L`` (the authors' script divides by 52 whatever the backbone).
    """
    model._check_task(task)
    scores = [layer.taps_score[task] for _, layer in model.taps_layers()]
    return torch.stack(scores).abs().sum() / (divisor or len(scores))


def layer_scores(model: TapsModel, task: str) -> "OrderedDict[str, float]":
    """``{layer_name: score}`` in forward order (one device sync for all layers)."""
    model._check_task(task)
    names, layers = zip(*model.taps_layers())
    values = torch.stack([layer.taps_score[task].detach().float() for layer in layers]).tolist()
    return OrderedDict(zip(names, values))


def gate_states(model: TapsModel, task: str) -> "OrderedDict[str, bool]":
    """``{layer_name: is task-specific}`` in forward order, decided as the forward decides
    (:func:`~taps_lightning.gate.gate_open`, one device sync for all layers)."""
    model._check_task(task)
    names, layers = zip(*model.taps_layers())
    states = gate_open(torch.stack([layer.taps_score[task] for layer in layers]), model.threshold).tolist()
    return OrderedDict(zip(names, states))


def count_params(model: TapsModel, task: str) -> dict[str, float]:
    """Parameter cost of ``task``.

    Returns a dict with ``active_layers`` / ``gated_layers`` (layers with a task-specific
    weight / layers that could have one), ``delta_params`` (weights of the active layers),
    ``norm_params`` and ``head_params`` (always task-specific), ``task_params`` (their sum:
    what the task stores besides the shared base), ``base_params`` (the shared backbone
    without a classifier) and ``fraction`` = ``task_params / base_params``.
    Scores (one scalar per layer) and norm running statistics are buffers of negligible
    size and are not counted, as in the paper.
    """
    if not isinstance(model, TapsModel) and hasattr(model, "count_params"):
        return model.count_params(task)  # e.g. ProgressiveAdapterModel: same keys
    gates = gate_states(model, task)
    layers = dict(model.taps_layers())
    delta_params = sum(layers[name].base_layer.weight.numel() for name, on in gates.items() if on)
    norm_params = sum(p.numel() for _, norm in model.task_norms() for p in norm.norms[task].parameters())
    head_params = sum(p.numel() for p in model.heads[task].parameters())
    task_params = delta_params + norm_params + head_params
    return {
        "active_layers": sum(gates.values()),
        "gated_layers": len(gates),
        "delta_params": delta_params,
        "norm_params": norm_params,
        "head_params": head_params,
        "task_params": task_params,
        "base_params": model.base_param_count,
        "fraction": task_params / model.base_param_count,
    }


def total_params_multiple(model: TapsModel) -> float:
    """Base plus every task's task-specific parameters, in units of one backbone (the
    paper's "Params" column, e.g. ``4.12x``)."""
    if not isinstance(model, TapsModel) and hasattr(model, "trainable_param_count"):
        return (model.base_param_count + model.trainable_param_count()) / model.base_param_count
    extra = sum(count_params(model, task)["task_params"] for task in model.tasks)
    return (model.base_param_count + extra) / model.base_param_count
