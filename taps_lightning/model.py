"""``TapsModel``: a backbone with TAPS layers, task-specific norms and one head per task."""
from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .gate import gate_open
from .inject import inject_taps, strip_classifier
from .layers import TapsLayer, create_taps_layer
from .norms import TaskNorm

__all__ = ["TapsModel"]

TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _backbone_name(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(backbone).__name__)


class TapsModel(nn.Module):
    """A backbone adapted to many tasks with Task Adaptive Parameter Sharing.

    Every Conv/Linear of ``backbone`` becomes ``w_base + I(s_task >= threshold) * delta_task``,
    every norm gets a copy per task, and every task gets a linear head. ``set_task`` picks
    the task that ``forward`` runs; switching is a pointer change, nothing is reloaded.

    Args:
        backbone: a timm or torchvision classifier (its classifier is removed, see
            :func:`~taps_lightning.inject.strip_classifier`) or any module returning pooled
            features (then give ``num_features``).
        tasks: ``{task_name: num_classes}`` to create now; more with :meth:`add_task`.
        threshold: ``tau``; a layer is task-specific for a task when its score is ``>= tau``.
        score_init: initial score of each layer for a new task (``> tau``: all layers start active).
        freeze_base: ``True`` for incremental TAPS (Eq. 3, shared weights frozen), ``False`` for
            joint TAPS (Eq. 4, shared weights trained by all tasks).
        exclude: module names (or prefixes) to leave shared and ungated.
        num_features: feature width of a backbone without classifier (a plain module whose
            forward returns pooled features); read from the classifier otherwise.
        backbone_name: name stored in exported adapters (default: timm architecture or class name).
        recompute_weight: rebuild each gated weight in backward instead of saving it (less
            training memory, one add more per active layer); ``False`` keeps it saved.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Mapping[str, int] | None = None,
        threshold: float = 0.1,
        score_init: float = 0.15,
        freeze_base: bool = True,
        exclude: Sequence[str] = (),
        num_features: int | None = None,
        backbone_name: str | None = None,
        recompute_weight: bool = True,
    ) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.score_init = float(score_init)
        self.backbone_name = backbone_name or _backbone_name(backbone)
        self.classifier = strip_classifier(backbone, num_features)
        self.head_path = self.classifier.path
        if num_features is not None and int(num_features) != self.classifier.num_features:
            raise ValueError(f"num_features={num_features}, but the backbone's classifier took "
                             f"{self.classifier.num_features} features; drop num_features or fix it")
        self.num_features = self.classifier.num_features
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        self.gated_names, self.norm_names = inject_taps(
            backbone, exclude=exclude,
            wrap_layer=lambda m: create_taps_layer(m, self.threshold, self.score_init, recompute_weight))
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.active_task: str | None = None
        self._forward_order: list[str] | None = None
        self.freeze_base = freeze_base
        self.set_base_trainable(not freeze_base)
        for task, num_classes in (tasks or {}).items():
            self.add_task(task, num_classes)
        if tasks:
            self.set_task(next(iter(tasks)))

    # -- structure -------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def num_classes(self) -> dict[str, int]:
        return {task: head.out_features for task, head in self.heads.items()}

    def taps_layers(self) -> Iterator[tuple[str, TapsLayer]]:
        """``(name, layer)`` for every gated layer, in forward order once a forward has run."""
        for name in self.layer_order():
            yield name, self.backbone.get_submodule(name)

    def task_norms(self) -> Iterator[tuple[str, TaskNorm]]:
        for name in self.norm_names:
            yield name, self.backbone.get_submodule(name)

    def layer_order(self) -> list[str]:
        """Gated layer names in the order the forward pass calls them (registration order
        before the first forward)."""
        return list(self._forward_order or self.gated_names)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all tasks (the base): everything but deltas, scores,
        task norms, norm templates and heads."""
        task_specific = {id(p) for p in self.task_parameters()}
        templates = {id(p) for _, n in self.task_norms() for p in n.base_norm.parameters()}
        for p in self.backbone.parameters():
            if id(p) not in task_specific and id(p) not in templates:
                yield p

    def task_parameters(self, task: str | None = None) -> Iterator[nn.Parameter]:
        """Task-specific parameters (deltas, scores, norms, head) of ``task`` or of all tasks."""
        tasks = [task] if task is not None else self.tasks
        for t in tasks:
            self._check_task(t)
            for _, layer in self.taps_layers():
                yield layer.taps_delta[t]
                yield layer.taps_score[t]
            for _, norm in self.task_norms():
                yield from norm.norms[t].parameters()
            yield from self.heads[t].parameters()

    def set_base_trainable(self, trainable: bool) -> None:
        """Train (joint TAPS) or freeze (incremental TAPS) the shared weights."""
        self.freeze_base = not trainable
        for p in self.shared_parameters():
            p.requires_grad_(trainable)

    # -- tasks -----------------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has tasks {self.tasks}. Add it with add_task().")

    def add_task(self, task: str, num_classes: int) -> None:
        """Add ``task``: zero deltas, fresh scores, copies of the pre-trained norms, a new head."""
        if not isinstance(task, str) or not TASK_NAME.match(task):
            raise ValueError(f"task name {task!r} must be non-empty and use only letters, digits, '_' or '-'")
        if task in self.heads:
            raise ValueError(f"task {task!r} exists already; remove_task({task!r}) first to replace it")
        if int(num_classes) < 1:
            raise ValueError(f"task {task!r}: num_classes must be >= 1, got {num_classes}")
        for _, layer in self.taps_layers():
            layer.add_task(task)
        for _, norm in self.task_norms():
            norm.add_task(task)
        ref = next(self.backbone.parameters())
        head = nn.Linear(self.num_features, int(num_classes), device=ref.device, dtype=ref.dtype)
        head.train(self.training)
        self.heads[task] = head

    def remove_task(self, task: str) -> None:
        self._check_task(task)
        for _, layer in self.taps_layers():
            layer.remove_task(task)
        for _, norm in self.task_norms():
            norm.remove_task(task)
        del self.heads[task]
        if self.active_task == task:
            self.set_task(None)

    def set_task(self, task: str | None) -> None:
        """Make ``task`` the one ``forward`` runs (``None``: the plain shared backbone)."""
        if task is not None:
            self._check_task(task)
        self.active_task = task
        for _, layer in self.taps_layers():
            layer.active_task = task
        for _, norm in self.task_norms():
            norm.active_task = task

    def set_taps_enabled(self, enabled: bool) -> None:
        """``False`` runs every task on the shared weights (norms and heads stay task-specific):
        the first phase of memory-efficient TAPS, where the base is trained jointly."""
        for _, layer in self.taps_layers():
            layer.taps_enabled = enabled

    # -- forward ---------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features of the active task's backbone (shared + its task-specific layers)."""
        layers = self._hint_gates()
        try:
            if self._forward_order is None:
                return self._forward_recording_order(x)
            return self.backbone(x)
        finally:
            for layer in layers:
                layer.gate_hint = None

    def _hint_gates(self) -> list[TapsLayer]:
        """Read every gate of the active task with one device sync and hand each layer its
        own, so no layer syncs on its own and inactive layers skip the weight add."""
        task = self.active_task
        if task is None or not (self.training or torch.is_grad_enabled()):
            return []
        layers = [layer for _, layer in self.taps_layers()]
        scores = torch.stack([layer.taps_score[task] for layer in layers])
        for layer, active in zip(layers, gate_open(scores, self.threshold).tolist()):
            layer.gate_hint = (task, active)
        return layers

    def forward(self, x: Tensor, task: str | None = None) -> Tensor:
        """Logits of ``task`` (default: the active task)."""
        if task is not None and task != self.active_task:
            self.set_task(task)
        if self.active_task is None:
            raise RuntimeError(f"no active task: call set_task(name) with one of {self.tasks} first")
        return self.heads[self.active_task](self.forward_features(x))

    def _forward_recording_order(self, x: Tensor) -> Tensor:
        order: list[str] = []
        hooks = [
            self.backbone.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: order.append(name))
            for name in self.gated_names
        ]
        try:
            out = self.backbone(x)
        finally:
            for hook in hooks:
                hook.remove()
        seen = set()
        forward_order = [n for n in order if not (n in seen or seen.add(n))]
        self._forward_order = forward_order + [n for n in self.gated_names if n not in seen]
        return out
