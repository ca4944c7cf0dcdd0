"""The ``TaskLayer`` contract every per-task layer kind keeps, one parametrized suite (a new kind is
tested by adding a case to ``KINDS``): a task computes what its case's reference, written out
here in float64 from the kind's own tensors, computes; a task added later computes the shared
layer; removing a task leaves the others as they were; a task's stored state loaded into another
layer computes the same; and the merged plain layer computes what the task does."""
import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taps_lightning as tl
from helpers import assert_rounding_close, two_task_taps_layer
from peft import LoraConfig, inject_adapter_in_model
from taps_lightning.models.lora import PeftLoRALayer
from taps_lightning.models.progressive import LoRALayer


@dataclass
class Kind:
    build: Callable[[], nn.Module]  # a layer with tasks "a" and "b", each with its own non-trivial state
    add: Callable[[nn.Module, str], None]  # add a task the kind's ordinary way
    reference: Callable[[nn.Module, str, torch.Tensor], torch.Tensor]  # float64, by hand
    terms: int  # roundings one product meets (for the float32 comparison)


def _conv64(layer_base: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), weight.double(), layer_base.bias.double(), layer_base.stride, layer_base.padding)


# -- TAPS: w + I(s >= tau) * delta ------------------------------------------------------------
def _taps():
    layer = two_task_taps_layer()  # random deltas; "b"'s gate closed, so "b" is the shared layer
    with torch.no_grad():
        layer.taps_score["b"].fill_(0.05)
    return layer


def _taps_reference(layer, task, x):
    on = layer.taps_score[task].item() >= layer.threshold
    weight = layer.base_layer.weight.detach().double() + (layer.taps_delta[task].detach().double() if on else 0)
    return _conv64(layer.base_layer, weight, x)


# -- task norms: each task's own BatchNorm copy (eval: its running statistics) --------------------
def _norm():
    torch.manual_seed(1)
    layer = tl.TaskNorm(nn.BatchNorm2d(3))
    with torch.no_grad():
        base = layer.base_norm
        base.running_mean.normal_(0, 0.3)
        base.running_var.uniform_(0.5, 2.0)
        for task in ("a", "b"):
            layer.add_task(task)
            norm = layer.norms[task]
            for t in (norm.weight, norm.bias, norm.running_mean):
                t.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return layer.eval()


def _norm_reference(layer, task, x):
    n = layer.norms[task] if task is not None else layer.base_norm
    d = lambda t: t.detach().double()
    return F.batch_norm(x.double(), d(n.running_mean), d(n.running_var), d(n.weight), d(n.bias), False, 0.0, n.eps)


# -- LoRA: w + B @ A * alpha / rank of the task's adapter -------------------------------------
def _lora():
    torch.manual_seed(2)
    layer = LoRALayer(nn.Conv2d(3, 4, 3), rank=2, alpha=3.0)
    for task in ("a", "b"):
        layer.add_adapter(task)
        layer.add_task(task, task)
        with torch.no_grad():
            layer.lora_B[task].normal_(0, 0.2)
    return layer


def _lora_add(layer, task):
    layer.add_adapter(task)
    layer.add_task(task, task)


def _lora_reference(layer, task, x):
    key = layer.adapter_of[task]
    low_rank = layer.lora_B[key].detach().double() @ layer.lora_A[key].detach().double()
    weight = layer.base_layer.weight.detach().double() + low_rank.view_as(layer.base_layer.weight) * 3.0 / 2
    return _conv64(layer.base_layer, weight, x)


# -- PEFT's LoRA (the LoRA baseline): w + B @ A * lora_alpha / r, A and B PEFT's own layers -------------
def _peft_add(layer, task):
    """PEFT's own injection (the adapter named after the task) into the wrapper's ``tuner``."""
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3.0, target_modules=["tuner"]), layer, adapter_name=task)
    layer.add_task(task)


def _peft():
    torch.manual_seed(2)
    holder = nn.Sequential(nn.Conv2d(3, 4, 3))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3.0, target_modules=["0"]), holder, adapter_name="a")
    layer = PeftLoRALayer(holder[0], rank=2)
    layer.add_task("a")
    _peft_add(layer, "b")
    with torch.no_grad():
        for task in ("a", "b"):
            layer.tuner.lora_B[task].weight.normal_(0, 0.2)
    return layer


def _peft_reference(layer, task, x):
    a, b = (layer.tuner.lora_A[task].weight.detach().double(), layer.tuner.lora_B[task].weight.detach().double())
    low_rank = (b.flatten(1) @ a.flatten(1)).view_as(layer.base_layer.weight)
    return _conv64(layer.base_layer, layer.base_layer.weight.detach().double() + low_rank * 3.0 / 2, x)


KINDS = {
    "taps": Kind(_taps, lambda layer, task: layer.add_task(task), _taps_reference, terms=3 * 9 + 4),
    "norm": Kind(_norm, lambda layer, task: layer.add_task(task), _norm_reference, terms=0),
    "lora": Kind(_lora, _lora_add, _lora_reference, terms=3 * 9 + 8),
    "peft_lora": Kind(_peft, _peft_add, _peft_reference, terms=2 * 3 * 9 + 8),  # base conv + A conv + B
}


def _run(layer, task, x):
    layer.set_task(task)
    with torch.no_grad():
        return layer(x)


def _assert_computes(got, expected, kind: Kind, x, msg=""):
    if kind.terms:  # a convolution: within the rounding bound of its sums
        magnitude = F.conv2d(x.double().abs(), torch.ones(4, 3, 3, 3, dtype=torch.float64)) * 10  # generous |w| <= 10
        assert_rounding_close(got, expected, magnitude, kind.terms, msg)
    else:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, msg=msg)


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]


X = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(5))


def test_each_task_computes_its_reference_and_the_tasks_differ(kind):
    layer = kind.build()
    assert isinstance(layer, tl.TaskLayer) and layer.tasks == ["a", "b"]
    outs = {}
    for task in ("a", "b"):
        outs[task] = _run(layer, task, X)
        _assert_computes(outs[task], kind.reference(layer, task, X), kind, X, task)
    assert not torch.allclose(outs["a"], outs["b"])


def test_a_task_added_later_computes_the_shared_layer(kind):
    layer = kind.build()
    kind.add(layer, "c")
    assert layer.tasks == ["a", "b", "c"]
    shared = _run(layer, None, X)  # the shared layer alone
    base = layer.base_norm if isinstance(layer, tl.TaskNorm) else layer.base_layer
    with torch.no_grad():
        torch.testing.assert_close(shared, base(X), rtol=0, atol=0)
        torch.testing.assert_close(_run(layer, "c", X), base(X), rtol=1e-6, atol=1e-6)


def test_removing_a_task_leaves_the_others_as_they_were(kind):
    layer = kind.build()
    before = _run(layer, "b", X)
    layer.set_task("a")
    layer.remove_task("a")
    assert layer.tasks == ["b"] and layer.active_task is None
    torch.testing.assert_close(_run(layer, "b", X), before, rtol=0, atol=0)
    with pytest.raises((KeyError, AttributeError)):  # nothing of "a" is held any more
        list(layer.task_parameters("a"))


def test_stored_state_loaded_into_another_layer_computes_the_same(kind):
    source = kind.build()
    target = kind.build()
    with torch.no_grad():  # the target's "a" starts elsewhere
        for p in target.task_parameters("a"):
            p.add_(torch.randn_like(p))
    state = source.task_state("a")
    assert set(state) <= set(source.state_shapes())
    assert all(v.shape == source.state_shapes()[k] and not v.requires_grad for k, v in state.items())
    target.load_task_state("a", copy.deepcopy(state))
    torch.testing.assert_close(_run(target, "a", X), _run(source, "a", X), rtol=0, atol=0)
    _assert_computes(_run(target, "a", X), kind.reference(source, "a", X), kind, X)
    with pytest.raises(Exception):  # another shape is refused
        bad = {k: torch.zeros(*v.shape, 2) for k, v in state.items()}
        target.load_task_state("a", bad)


def test_the_merged_layer_is_plain_and_computes_the_task(kind):
    layer = kind.build()
    for task in ("a", "b"):
        merged = layer.merged_layer(task)
        assert not isinstance(merged, tl.TaskLayer) and not any(isinstance(m, tl.TaskLayer) for m in merged.modules())
        with torch.no_grad():
            out = merged.eval()(X)
        _assert_computes(out, kind.reference(layer, task, X), kind, X, task)
    # merging leaves the layer as it was
    _assert_computes(_run(layer, "a", X), kind.reference(layer, "a", X), kind, X)
