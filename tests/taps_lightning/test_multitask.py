"""``taps_lightning.models.multitask``: the interface every multi-task model shares. ``task_cost_of`` adds up
what a task stores, ``default_backbone_name`` is what task files record, and ``MultiTaskModel``'s
defaults (switching tasks in every per-task layer, routing the forward to the task's head, refusing
unknown and duplicate tasks by name, the norms and head a task owns, the paper's "Params" multiple)
on the least subclass that defines a backbone, heads and a cost."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import taps_lightning as tl
from taps_lightning.models.multitask import MultiTaskModel, default_backbone_name, task_cost_of
from taps_lightning.core.norms import TaskNorm


class _Toy(MultiTaskModel):
    """The least subclass: a gated Linear(3, 4), a task BatchNorm1d(4), a ReLU and a task LayerNorm(4)
    (nested one level) as the backbone, a head per task, and a cost of its norms and head."""

    def __init__(self, tasks=None):
        super().__init__()
        plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Sequential(nn.LayerNorm(4)))
        self.num_features = 4
        self.base_param_count = sum(p.numel() for p in plain.parameters())
        self.backbone = nn.Sequential(tl.create_taps_layer(plain[0]), TaskNorm(plain[1]), plain[2],
                                      nn.Sequential(TaskNorm(plain[3][0])))
        for task, num_classes in (tasks or {}).items():
            self.add_task(task, num_classes)

    def add_task(self, task, num_classes):
        self._check_new_task(task, num_classes)
        for _, layer in self.task_layers():
            layer.add_task(task)
        self.heads[task] = self._new_head(num_classes)

    def forward_features(self, x):
        return self.backbone(x)

    def task_cost(self, task):
        return task_cost_of(0, 1, 0, *self.norm_and_head_params(task), self.base_param_count)


def _toy_with_distinct_tasks() -> _Toy:
    """Tasks ``a`` (2 classes) and ``b`` (3), in float64 and eval mode, each with its own random delta,
    norm statistics and affine parameters, so that each layer tells them apart."""
    torch.manual_seed(0)
    model = _Toy({"a": 2, "b": 3}).double().eval()
    with torch.no_grad():
        for _, layer in model.task_layers():
            for task in layer.tasks:
                for p in layer.task_parameters(task):
                    if p.dim():  # deltas and norm parameters; the scores stay open
                        p.normal_()
        for task in ("a", "b"):
            bn = model.backbone[1].task_norm(task)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _by_hand(model: _Toy, task: str, x: torch.Tensor) -> torch.Tensor:
    """``task``'s logits written out with torch.nn.functional from its own tensors."""
    gated, bn, ln = model.backbone[0], model.backbone[1].task_norm(task), model.backbone[3][0].task_norm(task)
    h = F.linear(x, gated.base_layer.weight + gated.taps_delta[task], gated.base_layer.bias)
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    h = F.layer_norm(torch.relu(h), (4,), ln.weight, ln.bias, ln.eps)
    return F.linear(h, model.heads[task].weight, model.heads[task].bias)


def test_task_cost_of_adds_the_parts_and_divides_by_the_base():
    cost = task_cost_of(active_layers=3, gated_layers=20, delta_params=1000, norm_params=40, head_params=55,
                        base_params=10_000)
    assert cost == {"active_layers": 3, "gated_layers": 20, "delta_params": 1000, "norm_params": 40,
                    "head_params": 55, "task_params": 1095, "base_params": 10_000, "fraction": 0.1095}
    assert task_cost_of(0, 0, 0, 0, 7, 70)["fraction"] == 0.1


def test_default_backbone_name_is_timms_architecture_else_the_class_name():
    assert default_backbone_name(timm.create_model("test_resnet", num_classes=0)) == "test_resnet"
    assert default_backbone_name(nn.Sequential(nn.Linear(2, 2))) == "Sequential"
    bare = nn.Linear(2, 2)
    bare.pretrained_cfg = None
    assert default_backbone_name(bare) == "Linear"
    bare.pretrained_cfg = {"architecture": None}
    assert default_backbone_name(bare) == "Linear"
    bare.pretrained_cfg = {"architecture": "my_net"}
    assert default_backbone_name(bare) == "my_net"


def test_task_layers_and_norms_are_named_relative_to_the_backbone():
    model = _Toy({"a": 2})
    assert [name for name, _ in model.task_layers()] == ["0", "1", "3.0"]
    assert [name for name, _ in model.task_norms()] == ["1", "3.0"]
    assert all(isinstance(norm, TaskNorm) for _, norm in model.task_norms())

    class _NoBackbone(MultiTaskModel):  # e.g. fine-tuning keeps one backbone per task, no `backbone`
        pass

    assert list(_NoBackbone().task_layers()) == [] and list(_NoBackbone().task_norms()) == []


def test_forward_routes_to_the_tasks_head_and_switches_every_task_layer():
    model = _toy_with_distinct_tasks()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = {t: _by_hand(model, t, x) for t in ("a", "b")}
        assert expected["a"].shape == (5, 2) and expected["b"].shape == (5, 3)
        for task in ("b", "a", "b"):
            torch.testing.assert_close(model(x, task), expected[task], msg=lambda m: f"forward(x, {task!r}): {m}")
            assert model.active_task == task and all(layer.active_task == task for _, layer in model.task_layers())
            torch.testing.assert_close(model(x), expected[task])  # no task given: the active one
        model.set_task("a")
        assert all(layer.active_task == "a" for _, layer in model.task_layers())
        torch.testing.assert_close(model(x), expected["a"])
        model.set_task(None)
        assert model.active_task is None and all(layer.active_task is None for _, layer in model.task_layers())
        with pytest.raises(RuntimeError, match=r"no active task: call set_task\(name\) with one of \['a', 'b'\]"):
            model(x)


def test_an_unknown_task_is_refused_by_name_and_nothing_switches():
    model = _toy_with_distinct_tasks()
    model.set_task("a")
    x = torch.randn(2, 3, dtype=torch.float64)
    message = r"unknown task 'c'; this model has tasks \['a', 'b'\]"
    with pytest.raises(KeyError, match=message):
        model.set_task("c")
    with pytest.raises(KeyError, match=message):
        model(x, "c")
    with pytest.raises(KeyError, match=message):
        model.task_batchnorms("c")
    assert model.active_task == "a" and all(layer.active_task == "a" for _, layer in model.task_layers())


def test_a_new_task_is_refused_by_name_when_it_exists_is_misnamed_or_has_no_class():
    model = _Toy({"a": 2})
    with pytest.raises(ValueError, match=r"task 'a' exists already; remove_task\('a'\) first"):
        model.add_task("a", 5)
    assert model.num_classes == {"a": 2} and model.backbone[0].tasks == ["a"]  # nothing replaced
    for bad in ("bad.name", "", "a b", 3):
        with pytest.raises(ValueError, match=f"task name {bad!r} must be non-empty"):
            model.add_task(bad, 2)
    with pytest.raises(ValueError, match="task 'c': num_classes must be >= 1, got 0"):
        model.add_task("c", 0)
    assert model.tasks == ["a"]
    model.add_task("c-2_x", 1)
    assert model.tasks == ["a", "c-2_x"] and model.num_classes == {"a": 2, "c-2_x": 1}


def test_a_new_head_follows_the_models_dtype_and_mode():
    model = _Toy({"a": 2}).double().eval()
    model.add_task("b", 3)
    head = model.heads["b"]
    assert (head.in_features, head.out_features) == (4, 3)
    assert head.weight.dtype == torch.float64 and not head.training
    model.train().add_task("c", 2)
    assert model.heads["c"].training and model.heads["c"].weight.dtype == torch.float64


def test_task_batchnorms_are_the_tasks_own_batchnorm_copies():
    model = _Toy({"a": 2, "b": 3})
    bn = model.backbone[1]
    assert [id(m) for m in model.task_batchnorms("b")] == [id(bn.task_norm("b"))]  # not LayerNorm, nor the template
    assert [id(m) for m in model.task_batchnorms("a")] == [id(bn.task_norm("a"))]


def test_norm_and_head_params_and_total_params_multiple_by_hand():
    model = _Toy({"a": 2, "b": 3})
    base = (3 * 4 + 4) + 2 * 4 + 2 * 4  # Linear(3, 4), BatchNorm1d(4) and LayerNorm(4) weights and biases
    assert model.base_param_count == base == 32
    norms = 2 * 4 + 2 * 4  # a task's BatchNorm and LayerNorm copies (running statistics are buffers)
    assert model.norm_and_head_params("a") == (norms, 4 * 2 + 2)
    assert model.norm_and_head_params("b") == (norms, 4 * 3 + 3)
    assert model.task_cost("b")["task_params"] == norms + 15
    assert model.total_params_multiple() == (base + (norms + 10) + (norms + 15)) / base == 89 / 32


def test_a_model_without_gates_has_nothing_to_show_or_export():
    model = _Toy({"a": 2})
    assert not model.can_export and not model.learns_gates
    assert list(model.score_parameters()) == []
    assert model.regularizer("a") is None and model.gate_tensor("a") is None
    assert model.layer_selection() is None and model.sharing() == {}
    with pytest.raises(NotImplementedError, match="_Toy has no task files; it stores tasks in its checkpoint"):
        model.task_file_metadata("a")
