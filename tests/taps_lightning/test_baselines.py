"""``taps_lightning.models.baselines``: the paper's reference points as ``MultiHeadModel`` flavours. Fine-tuning
holds one independent backbone copy per task, the feature extractor trains the heads alone on a
frozen backbone kept in eval mode, joint fine-tuning trains one backbone shared by every task; what
each task costs is counted by hand on timm's random ``test_resnet`` (nothing downloaded)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import taps_lightning as tl
from helpers import assert_rounding_close, exact_and_magnitude

#: ``(copy_per_task, train_backbone)`` of each flavour.
FLAVOURS = {"finetune": (True, True), "feature_extractor": (False, False), "joint_finetune": (False, True)}
TASKS = {"a": 3, "b": 5}


def _model(flavour: str, tasks=None) -> tl.MultiHeadModel:
    torch.manual_seed(0)
    copy_per_task, train_backbone = FLAVOURS[flavour]
    return tl.MultiHeadModel(timm.create_model("test_resnet"), tasks or TASKS, copy_per_task=copy_per_task,
                             train_backbone=train_backbone)


def _plain() -> nn.Module:
    """The backbone every model above starts from, its classifier removed by timm itself."""
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet")
    plain.reset_classifier(0)
    return plain


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def _sgd_step(model: tl.MultiHeadModel, task: str) -> None:
    """One SGD step (lr 0.1) on ``task``'s cross-entropy over a random batch, in train mode."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % TASKS[task]
    F.cross_entropy(model(x, task), y).backward()
    optimizer.step()


def test_finetuning_holds_one_independent_backbone_copy_per_task():
    model = _model("finetune")
    plain = _plain()
    assert not hasattr(model, "backbone") and list(model.backbones) == ["a", "b"]
    a, b = model.backbones["a"], model.backbones["b"]
    assert not {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}
    for copy in (a, b):  # each copy starts as the backbone given, classifier removed
        assert copy.state_dict().keys() == plain.state_dict().keys()
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in copy.state_dict().items())
        assert all(p.requires_grad for p in copy.parameters())
    assert list(model.shared_parameters()) == []
    assert [id(p) for p in model.task_parameters("b")] == [id(p) for p in [*b.parameters(), *model.heads["b"].parameters()]]
    assert [id(p) for p in model.task_parameters()] == [
        id(p) for p in [*a.parameters(), *model.heads["a"].parameters(), *b.parameters(), *model.heads["b"].parameters()]]

    before = {"a": _state(a), "b": _state(b), "head_b": _state(model.heads["b"])}
    _sgd_step(model, "a")
    assert {k for k in _changed(a, before["a"]) if k.endswith("weight")}  # a's copy trained
    assert not _changed(b, before["b"]) and not _changed(model.heads["b"], before["head_b"])
    assert all(p.grad is None for p in [*b.parameters(), *model.heads["b"].parameters()])
    # b still runs the untouched backbone (its own copy), a its trained one
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, "b"), model.heads["b"](plain(x)), rtol=0, atol=0)  # the same computation
        assert not torch.allclose(model(x, "a"), model.heads["a"](plain(x)))


def test_feature_extractor_trains_the_heads_alone_on_a_frozen_backbone():
    model = _model("feature_extractor")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert [id(p) for p in model.shared_parameters()] == [id(p) for p in model.backbone.parameters()]
    assert [id(p) for p in model.task_parameters("a")] == [id(p) for p in model.heads["a"].parameters()]
    backbone, heads = _state(model.backbone), {t: _state(model.heads[t]) for t in TASKS}
    _sgd_step(model, "a")
    # nothing of the backbone moves, its BatchNorm statistics included (it ran in eval mode)
    assert not _changed(model.backbone, backbone)
    assert _changed(model.heads["a"], heads["a"]) == {"weight", "bias"} and not _changed(model.heads["b"], heads["b"])


def test_a_frozen_backbone_stays_in_eval_mode_and_a_trained_one_follows_the_model():
    frozen, joint, finetune = _model("feature_extractor"), _model("joint_finetune"), _model("finetune")
    assert not any(m.training for m in frozen.backbone.modules())  # from the start
    for mode in (True, False, True):
        for model in (frozen, joint, finetune):
            model.train(mode)
            assert model.training is mode and all(h.training is mode for h in model.heads.values())
        assert not any(m.training for m in frozen.backbone.modules())
        assert all(m.training is mode for m in joint.backbone.modules())
        assert all(m.training is mode for net in finetune.backbones.values() for m in net.modules())
    assert frozen.eval().train() is frozen


def test_joint_finetuning_trains_one_backbone_every_task_runs():
    backbone = timm.create_model("test_resnet")
    model = tl.MultiHeadModel(backbone, TASKS, copy_per_task=False, train_backbone=True)
    assert model.backbone is backbone and not hasattr(model, "backbones")  # not copied
    assert all(p.requires_grad for p in backbone.parameters())
    assert [id(p) for p in model.shared_parameters()] == [id(p) for p in backbone.parameters()]
    assert [id(p) for p in model.task_parameters("b")] == [id(p) for p in model.heads["b"].parameters()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x, "a")
    shared, head_a = _state(model.backbone), _state(model.heads["a"])
    _sgd_step(model, "b")  # b's loss trains the backbone ...
    assert {k for k in _changed(model.backbone, shared) if k.endswith("weight")}
    assert not _changed(model.heads["a"], head_a)
    with torch.no_grad():  # ... that a runs: a's logits change with its head untouched
        assert not torch.allclose(model.eval()(x, "a"), before)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_task_cost_and_total_params_multiple_by_hand(flavour):
    plain = _plain()
    base = sum(p.numel() for p in plain.parameters())
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in plain.modules())
    assert layers == 15 and plain.num_features == 96 and base == 372_688
    model = _model(flavour)
    assert model.base_param_count == base and model.num_features == 96  # counted without the classifier
    copy = base if flavour == "finetune" else 0  # a whole backbone per task, or nothing but the head
    for task, classes in TASKS.items():
        head = 96 * classes + classes
        assert model.task_cost(task) == {
            "active_layers": layers if copy else 0, "gated_layers": layers, "delta_params": copy, "norm_params": 0,
            "head_params": head, "task_params": copy + head, "base_params": base,
            "fraction": (copy + head) / base}, task
    heads = 96 * 3 + 3 + 96 * 5 + 5
    assert model.total_params_multiple() == pytest.approx((base + 2 * copy + heads) / base, rel=1e-12)


def test_task_batchnorms_are_the_tasks_own_copy_or_none_when_shared():
    finetune = _model("finetune")
    for task in TASKS:
        own = [m for m in finetune.backbones[task].modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(own) == 15 and [id(m) for m in finetune.task_batchnorms(task)] == [id(m) for m in own]
    assert not {id(m) for m in finetune.task_batchnorms("a")} & {id(m) for m in finetune.task_batchnorms("b")}
    for flavour in ("feature_extractor", "joint_finetune"):
        assert _model(flavour).task_batchnorms("a") == []  # a shared backbone's norms belong to no one task
    with pytest.raises(KeyError, match="unknown task 'c'"):
        finetune.task_batchnorms("c")


def test_the_first_task_is_active_and_the_forward_routes_to_each_head():
    model = _model("joint_finetune").eval()
    assert model.active_task == "a" and model.backbone_name == "test_resnet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.backbone(x)
        assert features.shape == (2, 96)
        for task in ("a", "b"):  # the same features through each task's head: 96 products and a bias
            head = model.heads[task]
            exact, magnitude = exact_and_magnitude(F.linear, features, head.weight, head.bias)
            got = model(x, task) if task == "b" else model(x)
            assert got.shape == (2, TASKS[task])
            assert_rounding_close(got, exact, magnitude, terms=97, msg=task)
    named = tl.MultiHeadModel(timm.create_model("test_resnet"), {"a": 2}, copy_per_task=False, train_backbone=False,
                              backbone_name="my_resnet")
    assert named.backbone_name == "my_resnet"


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_misnamed_task_is_refused_by_the_name_rule(flavour):
    with pytest.raises(ValueError, match="task name 'bad.name' must be non-empty and use only letters, digits"):
        _model(flavour, {"a": 2, "bad.name": 2})


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_task_without_classes_is_refused_by_name(flavour):
    with pytest.raises(ValueError, match="task 'b': num_classes must be >= 1, got 0"):
        _model(flavour, {"a": 2, "b": 0})
