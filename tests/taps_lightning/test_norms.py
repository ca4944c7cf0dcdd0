"""``taps_lightning.core.norms``: a TaskNorm keeps one trained copy of a norm per task beside the frozen
pre-trained template, runs the active task's copy (the template with no task), and training one
task's copy changes nothing of another's; ``task_batchnorms_of`` lists the BatchNorms that keep
running statistics."""
import pytest
import timm
import torch
from torch import nn

from taps_lightning.core.norms import TaskNorm, task_batchnorms_of


def _batchnorm() -> nn.BatchNorm2d:
    """A BatchNorm2d(3) whose affine parameters and statistics are not their initial 1 and 0."""
    bn = nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.1, 0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([1.5, 2.0, 2.5]))
    bn.num_batches_tracked.fill_(7)
    return bn


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_each_task_gets_its_own_copy_equal_to_the_template():
    bn = _batchnorm()
    template = _state(bn)
    norm = TaskNorm(bn)
    norm.add_task("a")
    assert norm.task_norm("a").training  # a copy starts in the mode its TaskNorm is in
    norm.eval().add_task("b")
    assert not norm.task_norm("b").training
    assert norm.tasks == ["a", "b"] and norm.base_norm is bn
    a, b = norm.task_norm("a"), norm.task_norm("b")
    assert len({id(bn), id(a), id(b)}) == 3
    for copy in (a, b):
        assert type(copy) is nn.BatchNorm2d
        assert copy.state_dict().keys() == template.keys()
        assert all(torch.equal(copy.state_dict()[k], template[k]) for k in template)
        assert all(p.requires_grad for p in copy.parameters())
        assert not {p.data_ptr() for p in copy.parameters()} & {p.data_ptr() for p in bn.parameters()}
    assert not any(p.requires_grad for p in bn.parameters())  # the pre-trained template never trains


def test_training_one_tasks_copy_leaves_the_others_and_the_template_unchanged():
    norm = TaskNorm(_batchnorm())
    for task in ("a", "b"):
        norm.add_task(task)
    before = {"a": _state(norm.task_norm("a")), "b": _state(norm.task_norm("b")), None: _state(norm.base_norm)}
    norm.train().set_task("a")
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    optimizer = torch.optim.SGD([p for p in norm.parameters() if p.requires_grad], lr=0.1)
    (norm(x) * torch.randn(4, 3, 5, 5)).sum().backward()
    optimizer.step()

    a = norm.task_norm("a")
    assert not torch.equal(a.weight, before["a"]["weight"]) and not torch.equal(a.bias, before["a"]["bias"])
    # its running mean moved by the BatchNorm rule, 0.9 x before + 0.1 x the batch mean per channel
    expected = 0.9 * before["a"]["running_mean"] + 0.1 * x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(a.running_mean, expected)
    assert int(a.num_batches_tracked) == 8
    for task, state in ((None, before[None]), ("b", before["b"])):
        other = norm.base_norm if task is None else norm.task_norm(task)
        assert all(p.grad is None for p in other.parameters()), task
        assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items()), task


def test_the_active_tasks_copy_runs_and_the_template_without_a_task():
    """LayerNorm written out: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension."""
    norm = TaskNorm(nn.LayerNorm(4))
    for task in ("a", "b"):
        norm.add_task(task)
    with torch.no_grad():
        norm.task_norm("a").weight.fill_(2.0)
        norm.task_norm("b").bias.fill_(-1.0)
    x = torch.randn(3, 4)
    standardized = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = {None: standardized, "a": 2 * standardized, "b": standardized - 1}
    with torch.no_grad():
        for task in ("a", None, "b"):
            norm.set_task(task)
            torch.testing.assert_close(norm(x), expected[task], msg=lambda m: f"task {task}: {m}")
    norm.set_task("a")
    assert norm.weight is norm.task_norm("a").weight  # attributes are the active norm's
    norm.set_task(None)
    assert norm.weight is norm.base_norm.weight and norm.normalized_shape == (4,)


def test_a_removed_task_loses_its_copy_and_stops_running():
    norm = TaskNorm(nn.BatchNorm2d(3))
    for task in ("a", "b"):
        norm.add_task(task)
    norm.set_task("a")
    norm.remove_task("a")
    assert norm.tasks == ["b"] and norm.active_task is None
    with pytest.raises(KeyError):
        norm.task_norm("a")


def test_task_tensors_and_the_merged_layer_are_the_tasks_copy_alone():
    norm = TaskNorm(nn.BatchNorm2d(3))
    norm.add_task("a")
    with torch.no_grad():
        norm.task_norm("a").bias.fill_(0.25)
    tensors = norm.task_tensors("a")
    assert set(tensors) == {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                            "norm.num_batches_tracked"}
    assert torch.equal(tensors["norm.bias"], torch.full((3,), 0.25)) and not tensors["norm.bias"].requires_grad
    merged = norm.merged_layer("a")
    assert type(merged) is nn.BatchNorm2d and merged is not norm.task_norm("a")
    assert torch.equal(merged.bias, torch.full((3,), 0.25)) and torch.equal(merged.weight, torch.ones(3))


def test_task_batchnorms_of_lists_only_batchnorms_that_keep_running_statistics():
    keeps = [nn.BatchNorm2d(3), nn.BatchNorm1d(4), timm.layers.BatchNormAct2d(5), nn.BatchNorm2d(6)]
    others = [nn.BatchNorm2d(3, track_running_stats=False), nn.LayerNorm(4), nn.GroupNorm(1, 4),
              nn.InstanceNorm2d(3, track_running_stats=True), nn.Conv2d(3, 3, 1)]  # statistics, but no BatchNorm
    first = nn.Sequential(keeps[0], others[0], nn.Sequential(others[1], keeps[1]), others[2])
    second = nn.Sequential(others[3], keeps[2], nn.ModuleList([others[4], keeps[3]]))
    found = task_batchnorms_of([first, second])
    assert [id(m) for m in found] == [id(m) for m in keeps]  # in module order, each once
    assert task_batchnorms_of([]) == [] and task_batchnorms_of([nn.Sequential(*others)]) == []
