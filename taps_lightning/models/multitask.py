"""``MultiTaskModel``: the one interface of every multi-task model in the package.

TAPS, progressive adapters and the baselines differ in what a task owns; everything else
(heads, switching tasks, the forward, what a task costs, exporting it) is asked through the
methods below. Training code, callbacks and export functions call these and never check which
class they hold, so a new model class is one subclass.
"""
from __future__ import annotations

import re
from typing import Iterator

from torch import Tensor, nn

from ..core.norms import TaskNorm, task_batchnorms_of
from ..core.task_layer import TaskLayer

__all__ = ["MultiTaskModel", "TASK_NAME", "default_backbone_name", "task_cost_of"]

TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def default_backbone_name(backbone: nn.Module) -> str:
    """timm's architecture name, else the class name (what task files record)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(backbone).__name__)


def task_cost_of(active_layers: int, gated_layers: int, delta_params: int, norm_params: int, head_params: int,
                 base_params: int) -> dict[str, float]:
    """The cost dict every model's :meth:`MultiTaskModel.task_cost` returns: the parts, the
    task's own parameters (``task_params``, their sum) and ``fraction`` of the base."""
    task_params = delta_params + norm_params + head_params
    return {"active_layers": active_layers, "gated_layers": gated_layers, "delta_params": delta_params,
            "norm_params": norm_params, "head_params": head_params, "task_params": task_params,
            "base_params": base_params, "fraction": task_params / base_params}


class MultiTaskModel(nn.Module):
    """A backbone shared by several tasks, one head per task.

    Subclasses set ``backbone_name``, ``base_param_count`` and ``num_features``, fill
    ``heads``, and implement :meth:`forward_features` and :meth:`task_cost`; the rest
    (:meth:`shared_parameters`, :meth:`task_parameters`, ...) has defaults.
    """

    #: The kind of task file a task is written as (:func:`~taps_lightning.save_task`; the format is
    #: :data:`taps_lightning.files.export.TASK_FORMATS`'); ``None``: tasks live in checkpoints only.
    task_file_kind: str | None = None

    @property
    def can_export(self) -> bool:
        """Whether tasks can be written as task files."""
        return self.task_file_kind is not None
    #: Whether each task selects its own layers (TAPS): :meth:`layer_selection` has something to show.
    learns_gates = False

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        self.active_task: str | None = None

    # -- tasks ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def num_classes(self) -> dict[str, int]:
        return {task: head.out_features for task, head in self.heads.items()}

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has tasks {self.tasks}. Add it with add_task().")

    def _check_new_task(self, task: str, num_classes: int) -> None:
        if not isinstance(task, str) or not TASK_NAME.match(task):
            raise ValueError(f"task name {task!r} must be non-empty and use only letters, digits, '_' or '-'")
        if task in self.heads:
            raise ValueError(f"task {task!r} exists already; remove_task({task!r}) first to replace it")
        if int(num_classes) < 1:
            raise ValueError(f"task {task!r}: num_classes must be >= 1, got {num_classes}")

    def _new_head(self, num_classes: int) -> nn.Linear:
        ref = next(self.parameters(), None)
        head = nn.Linear(self.num_features, int(num_classes),
                         device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        return head.train(self.training)

    def task_layers(self) -> Iterator[tuple[str, TaskLayer]]:
        """Every per-task layer (TAPS layers, task norms, adapters) of ``self.backbone``, named
        relative to it (the names task files use)."""
        backbone = getattr(self, "backbone", None)
        for name, module in (backbone.named_modules() if backbone is not None else ()):
            if isinstance(module, TaskLayer):
                yield name, module

    def task_norms(self) -> Iterator[tuple[str, TaskNorm]]:
        """The task-specific norms, in the backbone's registration order."""
        for name, layer in self.task_layers():
            if isinstance(layer, TaskNorm):
                yield name, layer

    def task_batchnorms(self, task: str) -> list[nn.Module]:
        """The BatchNorms only ``task`` runs (what :func:`~taps_lightning.recalibrate_norms`
        re-estimates): its copies of the task-specific norms. Shared norms are not listed."""
        self._check_task(task)
        return task_batchnorms_of(norm.task_norm(task) for _, norm in self.task_norms())

    def set_task(self, task: str | None) -> None:
        """Make ``task`` the one :meth:`forward` runs (``None``: the shared backbone alone);
        switching is a pointer change in every per-task layer, nothing is reloaded."""
        if task is not None:
            self._check_task(task)
        self.active_task = task
        for _, layer in self.task_layers():
            layer.set_task(task)

    # -- forward -------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features of the active task's backbone."""
        raise NotImplementedError

    def forward(self, x: Tensor, task: str | None = None) -> Tensor:
        """Logits of ``task`` (default: the active task), switching to it if needed."""
        if task is not None and task != self.active_task:
            self.set_task(task)
        if self.active_task is None:
            raise RuntimeError(f"no active task: call set_task(name) with one of {self.tasks} first")
        return self.heads[self.active_task](self.forward_features(x))

    # -- what is trained, and what a task costs ------------------------------------------
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task uses (the base): the backbone's, less what its task layers hold
        per task or as templates (their declared :attr:`~TaskLayer.adapter_layer_names` and
        :attr:`~TaskLayer.other_param_names`): the one rule that splits parameters."""
        own = {id(p) for _, layer in self.task_layers() for p in layer.own_parameters()}
        return (p for p in self.backbone.parameters() if id(p) not in own)

    def task_parameters(self, task: str | None = None) -> Iterator[nn.Parameter]:
        """Parameters of ``task`` alone (or of every task): by default what each per-task layer holds
        for it (:meth:`~TaskLayer.task_parameters`) and its head."""
        for t in [task] if task is not None else self.tasks:
            self._check_task(t)
            for _, layer in self.task_layers():
                yield from layer.task_parameters(t)
            yield from self.heads[t].parameters()

    def score_parameters(self) -> Iterator[nn.Parameter]:
        """Every task's layer scores (TAPS; none elsewhere): their own learning rate, no weight
        decay, and no update while gates are frozen."""
        return iter(())

    def regularizer(self, task: str, divisor: float | None = None, penalty: str = "layers") -> Tensor | None:
        """The task's extra loss term before its weight (TAPS: the sparsity penalty); ``None``: none."""
        return None

    def task_cost(self, task: str) -> dict[str, float]:
        """``active_layers``, ``gated_layers``, ``delta_params``, ``norm_params``, ``head_params``,
        ``task_params`` (what the task stores besides the shared base), ``base_params`` and
        ``fraction`` = ``task_params / base_params``."""
        raise NotImplementedError

    def norm_and_head_params(self, task: str) -> tuple[int, int]:
        """Trained parameters of ``task``'s norms and of its head (what every task owns)."""
        norms = sum(p.numel() for _, norm in self.task_norms() for p in norm.task_norm(task).parameters())
        return norms, sum(p.numel() for p in self.heads[task].parameters())

    def minimum_fractions(self) -> dict[str, float]:
        """``{task: fraction}`` each task stores with no task-specific layer: its norms and head
        (the smallest storage budget it can meet)."""
        return {task: sum(self.norm_and_head_params(task)) / self.base_param_count for task in self.tasks}

    def total_params_multiple(self) -> float:
        """Base plus every task's own parameters, in backbones (the paper's "Params" column)."""
        extra = sum(self.task_cost(task)["task_params"] for task in self.tasks)
        return (self.base_param_count + extra) / self.base_param_count

    def gate_tensor(self, task: str) -> Tensor | None:
        """``task``'s gates as a bool tensor on the model's device, in forward order (no host
        sync; for counting flips), or ``None`` for models without gates."""
        return None

    # -- what callbacks show -------------------------------------------------------------
    def layer_selection(self) -> tuple[list[str], Tensor, float] | None:
        """``(layer names in forward order, scores [tasks, layers], threshold)`` for models that
        select layers per task (TAPS); ``None`` otherwise."""
        return None

    def sharing(self) -> dict[int, list[list[str]]]:
        """Which tasks share which per-stage adapters (progressive adapters); empty otherwise."""
        return {}

    # -- export --------------------------------------------------------------------------
    def task_file_metadata(self, task: str) -> dict[str, str]:
        """The metadata of ``task``'s file (the tensors' layout is :mod:`~taps_lightning.files.export`'s)."""
        raise NotImplementedError(f"{type(self).__name__} has no task files; it stores tasks in its checkpoint")
