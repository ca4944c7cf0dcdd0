"""``taps_lightning.core.layers``: a TAPS layer's own verbs (score, delta, closing a gate) act on one task,
and its task-file state (the score always, the delta while the gate is open) round-trips. The verbs
every per-task layer shares: test_task_layer.py."""
import pytest
import torch
from torch import nn

import taps_lightning as tl
from helpers import two_task_taps_layer
from taps_lightning.core.gate import gate_open


def test_score_delta_and_close_gate_act_on_that_task_alone():
    layer = two_task_taps_layer(threshold=0.1)
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
    layer = two_task_taps_layer()
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
