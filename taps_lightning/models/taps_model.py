"""``TapsModel``: a backbone with TAPS layers, task-specific norms and one head per task."""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.config import SCORE_INIT, THRESHOLD, TapsConfig
from ..core.gate import gate_open
from ..core.inject import inject_taps, strip_classifier
from ..core.layers import TapsLayer, create_taps_layer
from .multitask import TASK_NAME, MultiTaskModel, default_backbone_name, task_cost_of
from ..core.signature import base_fingerprint, layout_signature

__all__ = ["TapsModel", "TASK_NAME"]



class TapsModel(MultiTaskModel):
    """A backbone adapted to many tasks with Task Adaptive Parameter Sharing.

    Every Conv/Linear of ``backbone`` becomes ``w_base + I(s_task >= threshold) * delta_task``,
    every norm gets a copy per task, and every task gets a linear head. ``set_task`` picks
    the task that ``forward`` runs; switching is a pointer change, nothing is reloaded.

    Args:
        backbone: a timm or torchvision classifier (its classifier is removed, see
            :func:`~taps_lightning.core.inject.strip_classifier`) or any module returning pooled
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
        config: a :class:`~taps_lightning.core.config.TapsConfig` instead of ``threshold``,
            ``score_init`` and ``recompute_weight`` (one object every layer reads).
    """

    task_file_kind = "taps"
    learns_gates = True

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Mapping[str, int] | None = None,
        threshold: float = THRESHOLD,
        score_init: float = SCORE_INIT,
        freeze_base: bool = True,
        exclude: Sequence[str] = (),
        num_features: int | None = None,
        backbone_name: str | None = None,
        recompute_weight: bool = True,
        config: TapsConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or TapsConfig(threshold, score_init, recompute_weight)
        self.backbone_name = backbone_name or default_backbone_name(backbone)
        self.classifier = strip_classifier(backbone, num_features)
        if num_features is not None and int(num_features) != self.classifier.num_features:
            raise ValueError(f"num_features={num_features}, but the backbone's classifier took "
                             f"{self.classifier.num_features} features; drop num_features or fix it")
        self.num_features = self.classifier.num_features
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        self.gated_names, self.norm_names = inject_taps(
            backbone, exclude=exclude, wrap_layer=lambda m: create_taps_layer(m, self.config))
        self.backbone = backbone
        self._forward_order: list[str] | None = None
        self.freeze_base = freeze_base
        self.set_base_trainable(not freeze_base)
        for task, num_classes in (tasks or {}).items():
            self.add_task(task, num_classes)
        if tasks:
            self.set_task(next(iter(tasks)))

    # -- structure -------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def score_init(self) -> float:
        return self.config.score_init

    def taps_layers(self) -> Iterator[tuple[str, TapsLayer]]:
        """``(name, layer)`` for every gated layer, in forward order once a forward has run."""
        for name in self.layer_order():
            yield name, self.backbone.get_submodule(name)

    def layer_order(self) -> list[str]:
        """Gated layer names in the order the forward pass calls them (registration order
        before the first forward)."""
        return list(self._forward_order or self.gated_names)

    def score_parameters(self) -> Iterator[nn.Parameter]:
        for _, layer in self.taps_layers():
            for task in layer.tasks:
                yield layer.score(task)

    def set_base_trainable(self, trainable: bool) -> None:
        """Train (joint TAPS) or freeze (incremental TAPS) the shared weights."""
        self.freeze_base = not trainable
        for p in self.shared_parameters():
            p.requires_grad_(trainable)

    # -- tasks -----------------------------------------------------------------------------
    def add_task(self, task: str, num_classes: int) -> None:
        """Add ``task``: zero deltas, fresh scores, copies of the pre-trained norms, a new head."""
        self._check_new_task(task, num_classes)
        self.config.warn_if_starts_off(task)
        for _, layer in self.task_layers():
            layer.add_task(task)
        self.heads[task] = self._new_head(num_classes)

    def remove_task(self, task: str) -> None:
        self._check_task(task)
        for _, layer in self.task_layers():
            layer.remove_task(task)
        del self.heads[task]
        if self.active_task == task:
            self.set_task(None)

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
        for layer, active in zip(layers, gate_open(self.task_scores(task), self.threshold).tolist()):
            layer.gate_hint = (task, active)
        return layers

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

    # -- what a task costs ------------------------------------------------------------------
    def task_scores(self, task: str) -> Tensor:
        """``task``'s scores ``[layers]`` in forward order, differentiable (on the device)."""
        self._check_task(task)
        return torch.stack([layer.score(task) for _, layer in self.taps_layers()])

    def gate_states(self, task: str) -> "OrderedDict[str, bool]":
        """``{layer_name: is task-specific}`` in forward order (one device sync)."""
        return OrderedDict(zip(self.layer_order(), self.gate_tensor(task).tolist()))

    def gate_tensor(self, task: str) -> Tensor:
        return gate_open(self.task_scores(task), self.threshold)

    def regularizer(self, task: str, divisor: float | None = None, penalty: str = "layers") -> Tensor:
        """The sparsity penalty before ``lambda``. Differentiable in the scores.

        ``penalty="layers"`` is the paper's ``sum_i |s_i| / L`` (Eq. 3; ``L`` = gated layers, or
        ``divisor``): every layer costs the same. ``"params"`` is ``sum_i (n_i / N) |s_i|``, each
        score weighted by its layer's share of the gated weights (``n_i`` of ``N``), so that a layer
        costs what it would store. Both weightings sum to 1 over the layers, so equal scores give
        equal penalties and the same ``lambda`` means a comparable pull.
        """
        layers = [layer for _, layer in self.taps_layers()]
        scores = self.task_scores(task)
        if penalty == "layers":
            return scores.abs().sum() / (divisor or len(layers))
        if penalty != "params":
            raise ValueError(f"unknown penalty {penalty!r}; choose 'layers' (the paper's) or 'params'")
        if divisor is not None:
            raise ValueError("a penalty divisor applies to penalty='layers' only (it replaces L)")
        sizes = torch.tensor([layer.base_layer.weight.numel() for layer in layers], dtype=torch.float64)
        return (scores.abs() * (sizes / sizes.sum()).to(scores)).sum()

    def task_cost(self, task: str) -> dict[str, float]:
        """Parameter cost of ``task`` (see :meth:`MultiTaskModel.task_cost`): the weights of its
        active layers, its norms and its head. Scores (one scalar per layer) and norm running
        statistics are buffers of negligible size and are not counted, as in the paper."""
        gates = self.gate_states(task)
        layers = dict(self.taps_layers())
        delta_params = sum(layers[name].base_layer.weight.numel() for name, on in gates.items() if on)
        return task_cost_of(sum(gates.values()), len(gates), delta_params, *self.norm_and_head_params(task),
                            self.base_param_count)

    def layer_selection(self) -> tuple[list[str], Tensor, float]:
        scores = (torch.stack([self.task_scores(t).detach().float() for t in self.tasks]) if self.tasks
                  else torch.zeros(0, len(self.layer_order())))
        return self.layer_order(), scores.cpu(), self.threshold

    # -- export ----------------------------------------------------------------------------
    def task_file_metadata(self, task: str) -> dict[str, str]:
        """What ties a task file (its active deltas, all its scores, norms and head) to this
        backbone (layout) and shared weights (fingerprint)."""
        gates = self.gate_states(task)
        return {
            "task": task, "backbone": self.backbone_name, "threshold": repr(self.threshold),
            "num_classes": str(self.heads[task].out_features), "gated_layers": str(len(gates)),
            "active_layers": str(sum(gates.values())), "layout_signature": layout_signature(self),
            "base_fingerprint": base_fingerprint(self), "layer_order": json.dumps(self.layer_order()),
        }
