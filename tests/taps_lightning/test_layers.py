"""``taps_lightning.layers`` and the task-layer protocol (``task_layer.TaskLayer``): every per-task layer
declares the attributes holding its per-task state and speaks the same verbs for it (score, delta,
closing a gate, and the task-file state), so that nothing outside a layer indexes them."""
import pytest
import torch
from torch import nn

import taps_lightning as tl
from taps_lightning.gate import gate_open
from taps_lightning.norms import TaskNorm
from taps_lightning.progressive import LoRALayer


def _taps_layer(threshold: float = 0.1) -> tl.TapsLayer:
    torch.manual_seed(0)
    layer = tl.create_taps_layer(nn.Conv2d(3, 4, 3), tl.TapsConfig(threshold=threshold, score_init=0.15))
    for task in ("a", "b"):
        layer.add_task(task)
    with torch.no_grad():
        layer.taps_delta["a"].copy_(torch.randn_like(layer.taps_delta["a"]))
        layer.taps_delta["b"].copy_(torch.randn_like(layer.taps_delta["b"]))
    return layer


def _per_task_state_names(layer: nn.Module) -> set[str]:
    """Attributes of ``layer`` itself that are dicts keyed by its tasks (found, not declared)."""
    tasks = set(layer.tasks)
    found = set()
    for name, child in layer.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ModuleDict)) and tasks and tasks <= set(child.keys()):
            found.add(name)
    return found


def test_each_layer_declares_exactly_the_attributes_that_hold_per_task_state():
    lora = LoRALayer(nn.Linear(5, 6), rank=2)
    lora.add_adapter("0")
    lora.add_task("a")
    lora.add_task("b")
    norm = TaskNorm(nn.BatchNorm2d(4))
    norm.add_task("a")
    norm.add_task("b")
    assert set(_taps_layer().adapter_layer_names) == _per_task_state_names(_taps_layer()) == {"taps_delta", "taps_score"}
    assert set(norm.adapter_layer_names) == _per_task_state_names(norm) == {"norms"}
    # LoRA keys its tensors by adapter, several tasks may share one: declared, found by adapter key
    assert set(lora.adapter_layer_names) == {"lora_A", "lora_B"}
    assert all(set(getattr(lora, n).keys()) == {"0"} for n in lora.adapter_layer_names)


def test_score_delta_and_close_gate_act_on_that_task_alone():
    layer = _taps_layer(threshold=0.1)
    assert layer.score("a") is layer.taps_score["a"] and layer.delta("b") is layer.taps_delta["b"]
    assert layer.is_active("a") and layer.is_active("b")
    x = torch.randn(2, 3, 8, 8)
    layer.set_task("a")
    on = layer(x)
    layer.close_gate("a")
    # just below tau: closed by the one gate rule, still a trainable parameter near tau
    assert not gate_open(layer.score("a"), 0.1) and 0.0999 > float(layer.score("a").detach()) > 0.098
    assert layer.score("a").requires_grad and layer.is_active("b")
    base = nn.functional.conv2d(x, layer.base_layer.weight, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # a closed layer is the base layer
    assert not torch.allclose(on, base)


def test_task_state_round_trips_and_a_closed_layer_stores_no_delta():
    layer = _taps_layer()
    shapes = layer.state_shapes()
    assert shapes == {"score": torch.Size([1]), "delta": torch.Size([4, 3, 3, 3])}
    state = layer.task_state("a")
    assert set(state) == {"score", "delta"} and all(state[k].shape == shapes[k] for k in state)
    assert float(state["score"]) == pytest.approx(0.15) and torch.equal(state["delta"], layer.taps_delta["a"])
    assert not state["delta"].requires_grad
    layer.close_gate("b")
    assert set(layer.task_state("b")) == {"score"}  # what a task file holds of a closed layer
    fresh = tl.create_taps_layer(nn.Conv2d(3, 4, 3), tl.TapsConfig())
    fresh.add_task("a")
    fresh.load_task_state("a", state)
    assert torch.equal(fresh.taps_delta["a"], layer.taps_delta["a"])
    assert torch.equal(fresh.taps_score["a"], layer.taps_score["a"])
    fresh.load_task_state("a", {"score": torch.tensor([0.05])})  # no delta given: the delta is kept
    assert float(fresh.taps_score["a"]) == pytest.approx(0.05)
    assert torch.equal(fresh.taps_delta["a"], layer.taps_delta["a"])


def test_norm_and_lora_state_round_trip_through_the_same_verbs():
    torch.manual_seed(0)
    norm = TaskNorm(nn.BatchNorm2d(4))
    norm.add_task("a")
    with torch.no_grad():
        norm.task_norm("a").weight.uniform_()
        norm.task_norm("a").running_var.uniform_(1, 2)
    state = norm.task_state("a")
    assert set(state) == set(norm.state_shapes()) == {f"norm.{k}" for k in nn.BatchNorm2d(4).state_dict()}
    other = TaskNorm(nn.BatchNorm2d(4))
    other.add_task("a")
    other.load_task_state("a", state)
    for k, v in norm.task_norm("a").state_dict().items():
        assert torch.equal(other.task_norm("a").state_dict()[k], v)

    lora = LoRALayer(nn.Linear(5, 6), rank=2)
    for key in ("0", "1"):
        lora.add_adapter(key)
    lora.add_task("a", "1")
    with torch.no_grad():
        lora.lora_B["1"].normal_()
    assert lora.state_shapes() == {"lora_A": torch.Size([2, 5]), "lora_B": torch.Size([6, 2])}
    state = lora.task_state("a")
    assert torch.equal(state["lora_B"], lora.lora_B["1"])  # the adapter on a's route, not adapter 0
    lora.route("a", "0")
    assert lora.adapter_for("a") == "0" and torch.equal(lora.task_state("a")["lora_B"], torch.zeros(6, 2))
    lora.copy_adapter("1", "0")
    assert torch.equal(lora.lora_B["0"], lora.lora_B["1"]) and lora.adapter_size("0") == 2 * 5 + 6 * 2
