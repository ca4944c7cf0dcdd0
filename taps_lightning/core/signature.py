"""What ties a task file to a model: the layout of its backbone and the values of its shared weights."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["layout_signature", "base_fingerprint"]


def layout_signature(model) -> str:
    """Hash of the gated layers' and norms' names and shapes: equal iff the backbones match."""
    h = hashlib.sha256()
    for name, layer in sorted(model.taps_layers()):
        h.update(f"{name}:{tuple(layer.base_layer.weight.shape)};".encode())
    for name, norm in model.task_norms():
        shapes = [tuple(t.shape) for t in norm.base_norm.state_dict().values()]
        h.update(f"{name}:{shapes};".encode())
    return h.hexdigest()[:16]


def base_fingerprint(model) -> str:
    """Hash of the shared weights' values: a task file only makes sense on the base it was trained with."""
    h = hashlib.sha256()
    for p in model.shared_parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
