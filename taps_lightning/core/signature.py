"""What ties a task file to a model: the layout of its backbone and the values of its shared weights."""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["layout_signature", "task_layout_signature", "base_fingerprint"]


def layout_signature(model) -> str:
    """Hash of the gated layers' and norms' names and shapes: equal iff the backbones match."""
    h = hashlib.sha256()
    for name, layer in sorted(model.taps_layers()):
        h.update(f"{name}:{tuple(layer.base_layer.weight.shape)};".encode())
    for name, norm in model.task_norms():
        shapes = [tuple(t.shape) for t in norm.base_norm.state_dict().values()]
        h.update(f"{name}:{shapes};".encode())
    return h.hexdigest()[:16]


def task_layout_signature(entries: Iterable[tuple[str, str, Mapping[str, Sequence[int]]]]) -> str:
    """Hash of ``(layer name, kind, {entry: shape})`` for every per-task layer a model's task files
    hold (the layout check of files other than TAPS'): equal iff a file's tensors fit the model."""
    h = hashlib.sha256()
    for name, kind, shapes in entries:
        h.update(f"{name}:{kind}:{sorted((k, tuple(v)) for k, v in shapes.items())};".encode())
    return h.hexdigest()[:16]


def base_fingerprint(model) -> str:
    """Hash of the shared weights' values: a task file only makes sense on the base it was trained with."""
    h = hashlib.sha256()
    for p in model.shared_parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
