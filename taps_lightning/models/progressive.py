"""Progressive task-specific adapters (Gangwar et al., 2025), beside TAPS on the same machinery.

Low-rank adapters (LoRA, ``B @ A`` with ``B = 0`` at the start, so training begins from the
pre-trained function) sit on the layers TAPS gates, injected by the same
:func:`~taps_lightning.core.inject.inject_taps`. The gated layers are split into stages; in the
first stage every task shares one adapter, in the last each has its own, and in between the
number of adapters grows by a schedule (default ``1 -> 2 -> 4 -> ... -> n_tasks``). Which tasks
share is decided from data: after a warm-up in which all adapters are shared, each task's
gradient with respect to a stage's shared adapter is collected over a few batches, the
pairwise cosine similarities are computed and tasks are grouped by agglomerative clustering
(average linkage; the most similar tasks share). The backbone stays frozen; norms and heads
are per task, as in TAPS.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.inject import inject_taps, strip_classifier
from ..core.layers import base_layer_getattr, call_with_weight, check_gatable
from .multitask import MultiTaskModel, default_backbone_name, task_cost_of
from ..core.signature import base_fingerprint
from ..core.task_layer import TaskLayer

__all__ = ["LoRALayer", "ProgressiveAdapterModel", "default_schedule", "assign_stages",
           "cosine_similarity_matrix", "group_tasks"]


#: LoRA rank of the progressive adapters unless told otherwise (``--model.adapter_rank``).
DEFAULT_ADAPTER_RANK = 8


class LoRALayer(TaskLayer, nn.Module):
    """A frozen ``base_layer`` plus low-rank weight deltas ``B @ A * alpha / rank``, one per adapter;
    each task is routed to one adapter (``adapter_of``), several tasks may share one."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, rank: int = DEFAULT_ADAPTER_RANK, alpha: float | None = None) -> None:
        super().__init__()
        check_gatable(base_layer)
        self.base_layer = base_layer
        self.rank = int(rank)
        self.scaling = float(alpha if alpha is not None else rank) / self.rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapter_of: dict[str, str] = {}
        self.active_task: str | None = None

    def add_adapter(self, key: str) -> None:
        weight = self.base_layer.weight
        fan_in = weight[0].numel()
        a = torch.empty(self.rank, fan_in, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[key] = nn.Parameter(a)
        self.lora_B[key] = nn.Parameter(torch.zeros(weight.shape[0], self.rank, device=weight.device, dtype=weight.dtype))

    def adapter_weight(self, key: str) -> Tensor:
        """``B @ A * alpha / rank`` of adapter ``key``."""
        return (self.lora_B[key] @ self.lora_A[key]).view_as(self.base_layer.weight) * self.scaling

    def adapter_parameters(self, key: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A, B)`` of adapter ``key``."""
        return self.lora_A[key], self.lora_B[key]

    def adapter_size(self, key: str) -> int:
        """Parameters adapter ``key`` stores."""
        return sum(p.numel() for p in self.adapter_parameters(key))

    def copy_adapter(self, source: str, target: str) -> None:
        """Start adapter ``target`` from adapter ``source``'s values."""
        with torch.no_grad():
            self.lora_A[target].copy_(self.lora_A[source])
            self.lora_B[target].copy_(self.lora_B[source])

    def adapter_for(self, task: str) -> str:
        """The adapter ``task`` runs through here."""
        return self.adapter_of[task]

    def route(self, task: str, key: str) -> None:
        """Run ``task`` through adapter ``key`` from now on."""
        self.adapter_of[task] = key

    # -- TaskLayer verbs: a task is a route to an adapter ------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.adapter_of)

    def add_task(self, task: str, adapter: str = "0") -> None:
        self.adapter_of[task] = adapter

    def _drop_task(self, task: str) -> None:
        del self.adapter_of[task]

    def task_parameters(self, task: str):
        yield from self.adapter_parameters(self.adapter_of[task])

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        return {"delta": self.adapter_weight(self.adapter_of[task]).detach()}

    def merged_layer(self, task: str) -> nn.Module:
        plain = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            plain.weight.add_(self.adapter_weight(self.adapter_of[task]).to(plain.weight.dtype))
        return plain

    def state_shapes(self) -> dict[str, torch.Size]:
        a, b = self.adapter_parameters(next(iter(self.lora_A)))
        return {"lora_A": a.shape, "lora_B": b.shape}

    def task_state(self, task: str) -> dict[str, Tensor]:
        """The adapter on ``task``'s path here (shared or its own)."""
        a, b = self.adapter_parameters(self.adapter_of[task])
        return {"lora_A": a.detach(), "lora_B": b.detach()}

    def load_task_state(self, task: str, state: dict[str, Tensor]) -> None:
        self._check_state(state)
        a, b = self.adapter_parameters(self.adapter_of[task])
        with torch.no_grad():
            a.copy_(state["lora_A"])
            b.copy_(state["lora_B"])

    @property
    def weight(self) -> Tensor:
        key = self.adapter_of.get(self.active_task) if self.active_task is not None else None
        base = self.base_layer.weight
        return base if key is None else base + self.adapter_weight(key)

    def forward(self, x: Tensor) -> Tensor:
        return call_with_weight(self.base_layer, x, self.weight)

    __getattr__ = base_layer_getattr


def default_schedule(num_tasks: int, num_stages: int) -> list[int]:
    """Adapters per stage: 1, 2, 4, ... (capped at ``num_tasks``) and ``num_tasks`` in the last stage."""
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    return [min(num_tasks, 2 ** s) for s in range(num_stages - 1)] + [num_tasks]


def assign_stages(backbone: nn.Module, names: Sequence[str], num_stages: int) -> list[int]:
    """Stage of each gated layer: timm's ``feature_info`` blocks split evenly into ``num_stages``
    (layers before the first block go to stage 0, after the last to the last stage); without
    ``feature_info``, the layers themselves are split evenly in order."""
    info = getattr(backbone, "feature_info", None)
    modules = [f["module"] for f in info] if isinstance(info, list) and info else []
    if not modules:
        return [min(num_stages - 1, i * num_stages // len(names)) for i in range(len(names))]
    current, blocks = 0, []
    for name in names:
        for i, module in enumerate(modules):
            if name == module or name.startswith(module + "."):
                current = i
                break
        blocks.append(current)
    return [min(num_stages - 1, b * num_stages // len(modules)) for b in blocks]


def cosine_similarity_matrix(vectors: Tensor) -> Tensor:
    """``[n, n]`` cosine similarities of the rows of ``vectors`` (``[n, d]``)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def group_tasks(similarity: Tensor, num_groups: int) -> tuple[list[list[int]], list[tuple[list[int], list[int], float]]]:
    """Agglomerative clustering (average linkage) of tasks into ``num_groups`` groups.

    Returns the groups (sorted lists of task indices, ordered by their first task) and the
    merges made, ``(group, group, average similarity)``, most similar first: the tree.
    """
    n = similarity.shape[0]
    if not 1 <= num_groups <= n:
        raise ValueError(f"cannot make {num_groups} groups of {n} tasks")
    sim = similarity.double()
    clusters = [[i] for i in range(n)]
    merges = []
    while len(clusters) > num_groups:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(sim[clusters[a]][:, clusters[b]].mean())
                if best is None or link > best[0]:
                    best = (link, a, b)
        link, a, b = best
        merges.append((list(clusters[a]), list(clusters[b]), link))
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters), merges


class ProgressiveAdapterModel(MultiTaskModel):
    """A frozen backbone with progressively task-specific LoRA adapters, task norms and heads.

    Args:
        backbone: timm/torchvision classifier (classifier removed) or feature extractor.
        tasks: ``{task: num_classes}``.
        rank: LoRA rank; ``alpha`` scales the update (``alpha / rank``; default 1).
        num_stages: stages the gated layers are split into.
        schedule: adapters per stage (default :func:`default_schedule`).
    """

    task_file_kind = "progressive"

    def __init__(self, backbone: nn.Module, tasks: Mapping[str, int], rank: int = DEFAULT_ADAPTER_RANK, alpha: float | None = None,
                 num_stages: int = 4, schedule: Sequence[int] | None = None, backbone_name: str | None = None) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("progressive adapters need at least one task")
        self.classifier = strip_classifier(backbone)
        self.num_features = self.classifier.num_features
        self.backbone_name = backbone_name or default_backbone_name(backbone)
        self.base_param_count = sum(p.numel() for p in backbone.parameters())
        self.gated_names, self.norm_names = inject_taps(backbone, wrap_layer=lambda m: LoRALayer(m, rank, alpha))
        self.backbone = backbone
        self.task_list = list(tasks)
        self.schedule = list(schedule) if schedule else default_schedule(len(tasks), num_stages)
        if len(self.schedule) != num_stages or any(not 1 <= k <= len(tasks) for k in self.schedule):
            raise ValueError(f"schedule {self.schedule} must give, for each of the {num_stages} stages, "
                             f"a number of adapters between 1 and {len(tasks)}")
        self.stage_of = dict(zip(self.gated_names, assign_stages(backbone, self.gated_names, num_stages)))
        backbone.requires_grad_(False)
        for name, layer in self.lora_layers():
            for k in range(self.schedule[self.stage_of[name]]):
                layer.add_adapter(str(k))
        for task, num_classes in tasks.items():
            self._check_new_task(task, num_classes)
            for _, norm in self.task_norms():
                norm.add_task(task)
            self.heads[task] = self._new_head(num_classes)
        self.grouped = False
        self.groups: dict[int, list[list[str]]] = {}
        self.assign({s: [self.task_list] for s in range(num_stages)}, copy_from_shared=False)
        self.grouped = False
        self.set_task(self.task_list[0])

    @property
    def num_stages(self) -> int:
        return len(self.schedule)

    def lora_layers(self):
        for name in self.gated_names:
            yield name, self.backbone.get_submodule(name)

    def task_parameters(self, task: str | None = None):
        """Adapters on the task's path (shared ones included), its norms and head; every
        adapter, norm and head once for ``task=None``."""
        if task is None:
            yield from (p for p in self.parameters() if p.requires_grad)
            return
        self._check_task(task)
        for _, layer in self.task_layers():
            yield from layer.task_parameters(task)
        yield from self.heads[task].parameters()

    def stage_parameters(self, stage: int, key: str = "0") -> list[nn.Parameter]:
        """The parameters of adapter ``key`` in every layer of ``stage``."""
        return [p for name, layer in self.lora_layers() if self.stage_of[name] == stage
                for p in layer.adapter_parameters(key)]

    def assign(self, groups: Mapping[int, Sequence[Sequence[str]]], copy_from_shared: bool = True) -> None:
        """Route tasks: in ``stage``, the tasks of ``groups[stage][g]`` use adapter ``g``.
        ``copy_from_shared`` starts every new adapter from the shared (warm-up) adapter 0."""
        for stage, stage_groups in groups.items():
            if len(stage_groups) > self.schedule[stage]:
                raise ValueError(f"stage {stage} has {self.schedule[stage]} adapters, not {len(stage_groups)}")
            self.groups[stage] = [list(g) for g in stage_groups]
            for name, layer in self.lora_layers():
                if self.stage_of[name] != stage:
                    continue
                for g, members in enumerate(stage_groups):
                    for task in members:
                        layer.route(task, str(g))
                    if copy_from_shared and g > 0:
                        layer.copy_adapter("0", str(g))
        self.grouped = True

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def sharing(self) -> dict[int, list[list[str]]]:
        return dict(self.groups) if self.grouped else {}

    # -- the grouping is part of the state (checkpoints, resume) ----------------------------
    def get_extra_state(self) -> dict:
        return {"grouped": self.grouped, "groups": {str(s): g for s, g in self.groups.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.assign({int(s): g for s, g in state["groups"].items()}, copy_from_shared=False)
        self.grouped = bool(state["grouped"])

    # -- costs ----------------------------------------------------------------------------
    def path_adapters(self, task: str) -> list[tuple[str, str]]:
        """``(layer, adapter)`` on ``task``'s path."""
        return [(name, layer.adapter_for(task)) for name, layer in self.lora_layers()]

    def task_cost(self, task: str) -> dict[str, float]:
        """``delta_params`` are the adapters on the task's path (shared ones included: the task
        needs them to run); ``active_layers`` counts the layers where its adapter is its own."""
        layers = dict(self.lora_layers())
        delta = sum(layers[n].adapter_size(k) for n, k in self.path_adapters(task))
        norm, head = self.norm_and_head_params(task)
        own = sum(1 for n, k in self.path_adapters(task)
                  if sum(1 for t in self.tasks if layers[n].adapter_for(t) == k) == 1)
        return task_cost_of(own, len(layers), delta, norm, head, self.base_param_count)

    def total_params_multiple(self) -> float:
        """Every adapter, norm and head counted once (a shared adapter serves several tasks)."""
        return (self.base_param_count + self.trainable_param_count()) / self.base_param_count

    def trainable_param_count(self) -> int:
        """Every adapter, norm and head once: what the whole multi-task model adds to the base."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def task_file_metadata(self, task: str) -> dict[str, str]:
        """A task file holds the task's path through the shared and task-specific adapters
        (``lora_A``/``lora_B`` of each layer), its norms and head (the format is :mod:`~taps_lightning.files.export`'s)."""
        return {
            "task": task, "backbone": self.backbone_name,
            "num_classes": str(self.heads[task].out_features), "schedule": json.dumps(self.schedule),
            "groups": json.dumps({str(s): g for s, g in self.groups.items()}),
            "path": json.dumps(self.path_adapters(task)), "base_fingerprint": base_fingerprint(self),
        }
