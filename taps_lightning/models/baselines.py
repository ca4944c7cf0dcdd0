"""The paper's reference points, with the same task interface as ``TapsModel``.

* fine-tuning (the paragon): a full copy of the backbone per task;
* feature extractor (the baseline): one frozen backbone, a trained head per task;
* joint fine-tuning (paper Table 5): one backbone trained by all tasks, a head per task.
"""
from __future__ import annotations

import copy
from typing import Mapping

from torch import Tensor, nn

from ..core.config import GATED_TYPES
from ..core.inject import strip_classifier
from .multitask import MultiTaskModel, default_backbone_name, task_cost_of
from ..core.norms import task_batchnorms_of

__all__ = ["MultiHeadModel"]


class MultiHeadModel(MultiTaskModel):
    """A backbone (shared or copied per task) with one linear head per task.

    Args:
        backbone: timm/torchvision classifier or feature extractor (classifier removed).
        tasks: ``{task: num_classes}``.
        copy_per_task: one backbone copy per task (fine-tuning) or one shared backbone.
        train_backbone: train the backbone(s); ``False`` freezes them in eval mode (feature extractor).
    """

    def __init__(self, backbone: nn.Module, tasks: Mapping[str, int], copy_per_task: bool,
                 train_backbone: bool, backbone_name: str | None = None) -> None:
        super().__init__()
        self.classifier = strip_classifier(backbone)
        self.num_features = self.classifier.num_features
        self.backbone_name = backbone_name or default_backbone_name(backbone)
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        #: Gated layers TAPS would have on this backbone (what ``task_cost`` reports as layers).
        self.layer_count = sum(isinstance(m, GATED_TYPES) for m in backbone.modules())
        self.copy_per_task = copy_per_task
        self.train_backbone = train_backbone
        for task, num_classes in tasks.items():  # before any copy is named after a task
            self._check_new_task(task, num_classes)
        if copy_per_task:
            self.backbones = nn.ModuleDict({t: copy.deepcopy(backbone) for t in tasks})
        else:
            self.backbone = backbone
        for task, num_classes in tasks.items():
            self.heads[task] = nn.Linear(self.num_features, int(num_classes))
        for net in self._backbones():
            net.requires_grad_(train_backbone)
        self.active_task = next(iter(tasks)) if tasks else None
        self.train()  # a frozen backbone starts (and, as Lightning preserves modes, stays) in eval mode

    def _backbones(self) -> list[nn.Module]:
        return list(self.backbones.values()) if self.copy_per_task else [self.backbone]

    def train(self, mode: bool = True) -> "MultiHeadModel":
        super().train(mode)
        if not self.train_backbone:  # a fixed feature extractor keeps its BatchNorm statistics
            for net in self._backbones():
                net.eval()
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        return (self.backbones[self.active_task] if self.copy_per_task else self.backbone)(x)

    def task_batchnorms(self, task: str) -> list[nn.Module]:
        """Fine-tuning: the BatchNorms of the task's own copy; a shared backbone has none of its own."""
        self._check_task(task)
        return task_batchnorms_of([self.backbones[task]]) if self.copy_per_task else []

    def shared_parameters(self):
        return iter(()) if self.copy_per_task else self.backbone.parameters()

    def task_parameters(self, task: str | None = None):
        for t in [task] if task is not None else self.tasks:
            if self.copy_per_task:
                yield from self.backbones[t].parameters()
            yield from self.heads[t].parameters()

    def task_cost(self, task: str) -> dict[str, float]:
        """Fine-tuning: a whole backbone copy and a head per task; otherwise the head alone."""
        head = sum(p.numel() for p in self.heads[task].parameters())
        delta = self.base_param_count if self.copy_per_task else 0
        return task_cost_of(self.layer_count if self.copy_per_task else 0, self.layer_count, delta, 0, head,
                            self.base_param_count)
