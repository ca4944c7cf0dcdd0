"""``taps_lightning.models.stats``: what a task costs (its sparsity penalty, which layers it adapts, how many
weights it stores) and how often its gates flip, checked against arithmetic done by hand on a
model small enough to count."""
import math

import pytest
import timm
import torch
from torch import nn

import taps_lightning as tl
from helpers import assert_rounding_close
from taps_lightning.models.stats import GateFlipCounter, count_params, gate_states, sparsity_loss, total_params_multiple

TAU = 0.1


def _plain_backbone() -> nn.Module:
    """Three layers to gate ("0": conv 3->4 3x3 with bias, "3": conv 4->6 1x1, "7": linear 6->5 with
    bias) and two norms ("1": BatchNorm2d(4), "4": GroupNorm(2, 6)); returns 5 features."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1, bias=False),
                         nn.GroupNorm(2, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def _tiny(tasks=None, threshold: float = TAU) -> tl.TapsModel:
    torch.manual_seed(0)
    return tl.TapsModel(_plain_backbone(), tasks or {"a": 3}, num_features=5, threshold=threshold, score_init=0.9)


def _set_scores(model: tl.TapsModel, task: str, scores: dict) -> None:
    with torch.no_grad():
        for name, value in scores.items():
            model.backbone.get_submodule(name).taps_score[task].fill_(value)


#: By hand: each gated layer's weight (the size of its delta), the task norms' weight and bias, and
#: the backbone's parameters (the biases of "0" and "7" are shared: no task stores them).
DELTA = {"0": 4 * 3 * 3 * 3, "3": 6 * 4 * 1 * 1, "7": 5 * 6}
NORMS = 2 * 4 + 2 * 6
BASE = DELTA["0"] + 4 + NORMS + DELTA["3"] + DELTA["7"] + 5


def _head(classes: int) -> int:
    return 5 * classes + classes


# -- the sparsity penalty -------------------------------------------------------------------------------
SCORES = {"0": 0.3, "3": -0.7, "7": 0.0125}


def test_the_sparsity_loss_is_the_mean_absolute_score_of_the_task():
    model = _tiny({"a": 3, "b": 2})
    _set_scores(model, "a", SCORES)
    _set_scores(model, "b", {"0": 5.0, "3": 5.0, "7": -5.0})  # another task's scores do not count
    fp32 = [float(torch.tensor(v)) for v in SCORES.values()]  # the scores as stored
    exact = math.fsum(abs(v) for v in fp32) / 3
    loss = sparsity_loss(model, "a")
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rounding_close(loss, torch.tensor(exact, dtype=torch.float64), exact, terms=4)  # 3 terms, 1 division


def test_a_divisor_replaces_the_number_of_layers():
    model = _tiny()
    _set_scores(model, "a", SCORES)
    exact = math.fsum(abs(float(torch.tensor(v))) for v in SCORES.values()) / 52
    assert_rounding_close(sparsity_loss(model, "a", divisor=52), torch.tensor(exact, dtype=torch.float64), exact,
                          terms=4)


def test_the_sparsity_loss_pulls_every_score_towards_zero_by_one_over_the_divisor():
    model = _tiny()
    _set_scores(model, "a", SCORES)
    sparsity_loss(model, "a", divisor=4).backward()
    grads = {name: float(layer.taps_score["a"].grad) for name, layer in model.taps_layers()}
    assert grads == {"0": 0.25, "3": -0.25, "7": 0.25}
    assert all(layer.taps_delta["a"].grad is None for _, layer in model.taps_layers())


# -- which layers a task adapts, and what it stores ------------------------------------------------------
@pytest.mark.parametrize("tau", [0.1, 0.7])  # fp32(0.1) is above 0.1, fp32(0.7) below 0.7: both are "at tau"
def test_a_layer_is_task_specific_when_its_score_reaches_tau_exactly(tau):
    model = _tiny(threshold=tau)
    below = float(torch.nextafter(torch.tensor(tau), torch.tensor(0.0)))  # the fp32 score just below fp32(tau)
    _set_scores(model, "a", {"0": tau, "3": below, "7": -0.5})
    states = gate_states(model, "a")
    assert list(states.items()) == [("0", True), ("3", False), ("7", False)]
    assert all(type(v) is bool for v in states.values())


def test_count_params_counts_the_active_deltas_the_task_norms_and_the_head_by_hand():
    model = _tiny({"a": 3})
    _set_scores(model, "a", {"0": 0.5, "3": 0.05, "7": TAU})  # "3" off
    assert (DELTA, NORMS, BASE) == ({"0": 108, "3": 24, "7": 30}, 20, 191)
    assert BASE == sum(p.numel() for p in _plain_backbone().parameters())
    counts = count_params(model, "a")
    task = 108 + 30 + 20 + 18
    assert counts == {"active_layers": 2, "gated_layers": 3, "delta_params": 108 + 30, "norm_params": 20,
                      "head_params": 18, "task_params": task, "base_params": 191, "fraction": task / 191}
    _set_scores(model, "a", {"0": -1.0, "3": -1.0, "7": -1.0})  # a linear probe: norms and head only
    assert count_params(model, "a")["task_params"] == 20 + 18 and count_params(model, "a")["active_layers"] == 0


def test_count_params_of_an_unknown_task_is_a_clear_error():
    baseline = tl.MultiHeadModel(timm.create_model("test_resnet"), {"a": 2}, copy_per_task=False,
                                 train_backbone=False)
    for model in (_tiny(), baseline):
        with pytest.raises(KeyError, match=r"unknown task 'z'; this model has tasks \['a'\]"):
            count_params(model, "z")


def test_the_total_is_the_base_plus_every_tasks_own_parameters_in_backbones():
    model = _tiny({"a": 3, "b": 7})
    _set_scores(model, "a", {"0": 0.5, "3": 0.05, "7": 0.5})
    _set_scores(model, "b", {"0": 0.05, "3": 0.5, "7": 0.05})
    a = DELTA["0"] + DELTA["7"] + NORMS + _head(3)
    b = DELTA["3"] + NORMS + _head(7)
    assert total_params_multiple(model) == pytest.approx((BASE + a + b) / BASE, rel=1e-15)
    model.remove_task("b")
    assert total_params_multiple(model) == pytest.approx((BASE + a) / BASE, rel=1e-15)


# -- gate flips ------------------------------------------------------------------------------------------
def _flips(counter: GateFlipCounter) -> dict:
    return {task: int(n) for task, n in counter.flips.items()}


def test_the_flip_counter_counts_each_gate_change_between_steps():
    model = _tiny({"a": 3, "b": 2})
    counter = GateFlipCounter()
    counter.start(model, model.tasks)
    assert _flips(counter) == {"a": 0, "b": 0}
    assert all(n.dtype == torch.long for n in counter.flips.values())
    _set_scores(model, "a", {"0": 0.05})  # a: one layer off
    _set_scores(model, "b", {"3": 0.05, "7": -1.0})  # b: two off
    counter.step(model)
    assert _flips(counter) == {"a": 1, "b": 2}
    _set_scores(model, "a", {"0": TAU})  # back on (exactly at tau): a second flip, though a ends as it began
    _set_scores(model, "b", {"3": 0.09, "7": 3.0})  # "3" moves but stays off; "7" comes back on
    counter.step(model)
    assert _flips(counter) == {"a": 2, "b": 3}
    _set_scores(model, "a", {"0": 0.9})  # a score that moves without crossing tau is no flip
    counter.step(model)
    counter.step(model)
    assert _flips(counter) == {"a": 2, "b": 3}


def test_starting_the_flip_counter_again_starts_from_zero_and_from_the_gates_now():
    model = _tiny({"a": 3, "b": 2})
    counter = GateFlipCounter()
    counter.start(model, ["a", "b"])
    _set_scores(model, "a", {"0": 0.05, "3": 0.05})
    counter.step(model)
    assert _flips(counter) == {"a": 2, "b": 0}
    counter.start(model, ["a"])  # a new epoch, counting "a" alone
    assert _flips(counter) == {"a": 0}
    counter.step(model)  # nothing changed since the start
    _set_scores(model, "b", {"0": 0.05})
    counter.step(model)
    assert _flips(counter) == {"a": 0}


def test_the_flip_counter_skips_models_without_gates():
    model = tl.MultiHeadModel(timm.create_model("test_resnet"), {"a": 2, "b": 3}, copy_per_task=False,
                              train_backbone=True)
    counter = GateFlipCounter()
    counter.start(model, model.tasks)
    counter.step(model)
    assert counter.flips == {} and counter.before == {}
