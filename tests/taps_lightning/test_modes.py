"""``taps_lightning.training.modes`` without Lightning: the modes by their flag names, which learn gates and
what each builds and trains, when the sparsity penalty applies, memory-efficient's two phases and
where its cosine restarts, and when progressive mode collects task gradients. (What each mode
trains in a real fit: test_modes_train.py.)"""
import copy
import types

import pytest
import timm
import torch

from helpers import explicit_task_network, randomize_tasks
from taps_lightning.training.budget import FixedLambda
from taps_lightning.errors import SettingsError
from taps_lightning.training.compose import create_taps_module, flag_defaults
from taps_lightning.training.modes import MODES, create_mode

#: The settings the modes read (``TapsModule.hparams`` in a run).
HP = dict(flag_defaults(), backbone="test_resnet", threshold=0.1, score_init=0.15, recompute_weight=True, lam=0.7,
          sparsity_warmup_epochs=0, joint_epochs=1, similarity_epochs=1, similarity_batches=8, adapter_rank=2,
          num_stages=2, adapter_schedule=None)


def _build(name, **hp):
    mode = create_mode(name, {**HP, **hp})
    torch.manual_seed(0)
    return mode, mode.build(timm.create_model("test_resnet", num_classes=0), {"a": 3, "b": 4})


def test_the_modes_by_their_flag_names_and_which_learn_gates():
    assert list(MODES) == ["incremental", "joint", "memory_efficient", "finetune", "linear", "joint_finetune",
                           "progressive", "lora"]
    assert all(MODES[name].name == name for name in MODES)  # each mode knows its flag value
    assert {name: create_mode(name, HP).learns_gates for name in MODES} == {
        "incremental": True, "joint": True, "memory_efficient": True,
        "finetune": False, "linear": False, "joint_finetune": False, "progressive": False, "lora": False}
    with pytest.raises(ValueError, match="^--model.mode: unknown mode 'Joint'; choose one of incremental, joint, memory_efficient, "
                                         "finetune, linear, joint_finetune, progressive, lora$"):
        create_mode("Joint", HP)


#: What each mode trains as built, by kind of parameter (the norms' pre-trained templates never).
TRAINED = {
    "incremental": ("TapsModel", {"taps_delta", "taps_score", "norms", "heads"}),
    "joint": ("TapsModel", {"base_layer", "taps_delta", "taps_score", "norms", "heads"}),
    "memory_efficient": ("TapsModel", {"taps_delta", "taps_score", "norms", "heads"}),  # until its first epoch
    "finetune": ("MultiHeadModel", {"backbones", "heads"}),
    "linear": ("MultiHeadModel", {"heads"}),
    "joint_finetune": ("MultiHeadModel", {"backbone", "heads"}),
    "progressive": ("ProgressiveAdapterModel", {"lora_A", "lora_B", "norms", "heads"}),
    "lora": ("LoRAModel", {"lora_A", "lora_B", "norms", "heads"}),
}
KINDS = ("taps_delta", "taps_score", "base_layer", "base_norm", "norms", "heads", "lora_A", "lora_B", "backbones",
         "backbone")


@pytest.mark.parametrize("name", list(TRAINED))
def test_each_mode_builds_its_model_and_trains_its_own_parameters(name):
    mode, model = _build(name)
    kinds = {}
    for param_name, p in model.named_parameters():
        kind = next(k for k in KINDS if k in param_name.split("."))
        kinds.setdefault(kind, set()).add(p.requires_grad)
    model_type, trained = TRAINED[name]
    assert type(model).__name__ == model_type
    assert {k for k, flags in kinds.items() if True in flags} == trained
    assert all(flags == {k in trained} for k, flags in kinds.items()), kinds  # each kind all trained or all frozen
    names = [n for n, _ in mode.optimizer_parameters(model)]
    if name == "memory_efficient":  # the base is switched on and off between phases: the optimizer holds it all
        assert names == [n for n, _ in model.named_parameters()]
    else:
        assert names == [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name, hp, active", [
    ("incremental", dict(sparsity_warmup_epochs=2), [False, False, True, True, True]),
    ("joint", dict(sparsity_warmup_epochs=0), [True, True, True, True, True]),
    ("memory_efficient", dict(joint_epochs=2, sparsity_warmup_epochs=1), [False, False, False, True, True]),
    ("memory_efficient", dict(joint_epochs=1, sparsity_warmup_epochs=0), [False, True, True, True, True]),
    ("linear", dict(sparsity_warmup_epochs=0), [False] * 5),
    ("finetune", dict(sparsity_warmup_epochs=0), [False] * 5),
    ("progressive", dict(sparsity_warmup_epochs=0), [False] * 5),
])
def test_the_penalty_applies_from_the_end_of_the_warm_up_in_modes_with_gates(name, hp, active):
    mode = create_mode(name, {**HP, **hp})
    assert [mode.penalty_active(epoch) for epoch in range(5)] == active
    fixed = FixedLambda(["a"], HP["lam"])  # what a run without a budget trains with at each epoch
    assert [fixed.step({"a": 0.5}, mode.penalty_active(e), True)["a"] for e in range(5)] == [
        0.7 if on else 0.0 for on in active]


@pytest.mark.parametrize("total, epochs, per_epoch, joint_epochs, boundary", [
    (10, 10, True, 2, 2),  # per epoch: the TAPS phase's first epoch
    (30, 31, True, 2, 2),  # a cosine over 30 epochs of a 31-epoch run (the authors' recipe)
    (3, 10, True, 5, 3),  # a joint phase longer than the cosine: no second cycle left
    (300, 10, False, 2, 60),  # per step: 30 steps an epoch x 2 joint epochs
    (7, 3, False, 2, 4),  # 7 steps over 3 epochs: 7 x 2 // 3, rounded down
    (5, 10, False, 2, 1),
    (100, None, False, 2, 0),  # no epoch count (a run bounded by max_steps): one cycle
])
def test_memory_efficient_restarts_its_cosine_where_the_taps_phase_starts(total, epochs, per_epoch, joint_epochs,
                                                                          boundary):
    mode = create_mode("memory_efficient", {**HP, "joint_epochs": joint_epochs})
    assert mode.taps_start_epoch() == joint_epochs
    assert mode.schedule_boundary(total, epochs, per_epoch) == boundary
    for name in ("incremental", "joint", "finetune", "progressive"):  # one cycle
        other = create_mode(name, {**HP, "joint_epochs": joint_epochs})
        assert other.taps_start_epoch() == 0 and other.schedule_boundary(total, epochs, per_epoch) == 0


def test_memory_efficient_trains_the_shared_network_first_then_taps_on_the_frozen_base():
    """The joint phase runs every task on the shared weights (its deltas are not used, its norms
    and head are) and trains them; the TAPS phase adds the deltas of the layers switched on and
    freezes the base. Each checked against the task's network written out (helpers)."""
    mode, model = _build("memory_efficient", joint_epochs=2)
    randomize_tasks(model, off=("layer1.0.conv1",))  # non-zero deltas, one layer off
    all_off = copy.deepcopy(model)  # the same weights with every gate closed: the shared network
    with torch.no_grad():
        for _, layer in all_off.taps_layers():
            layer.taps_score["a"].fill_(0.05)
    x = torch.randn(2, 3, 32, 32)
    for epoch, reference, base_trained in ((0, all_off, True), (1, all_off, True), (2, model, False)):
        mode.enter_epoch(model, epoch)
        assert all(p.requires_grad == base_trained for n, p in model.named_parameters() if ".base_layer." in n), epoch
        with torch.no_grad():
            expected = explicit_task_network(reference, "a")[0].eval()(x)
            torch.testing.assert_close(model.eval()(x, "a"), expected, msg=lambda m: f"epoch {epoch}: {m}")


def test_memory_efficient_costs_a_task_its_norms_and_head_in_the_joint_phase():
    """Counted on a plain timm test_resnet: 15 convolutions (no bias), 15 BatchNorms, a 96-wide head."""
    plain = timm.create_model("test_resnet", num_classes=0)
    base = sum(p.numel() for p in plain.parameters())
    convs = sum(m.weight.numel() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    norms = sum(p.numel() for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    head = 96 * 3 + 3
    mode, model = _build("memory_efficient", joint_epochs=2)  # every layer on (score_init 0.15 >= 0.1)
    for epoch in (0, 1):
        assert mode.task_cost(model, "a", epoch) == {
            "active_layers": 0, "gated_layers": 15, "delta_params": 0, "norm_params": norms, "head_params": head,
            "task_params": norms + head, "base_params": base, "fraction": (norms + head) / base}
    cost = mode.task_cost(model, "a", 2)
    assert (cost["active_layers"], cost["delta_params"], cost["task_params"]) == (15, convs, convs + norms + head)
    assert cost["fraction"] == pytest.approx((convs + norms + head) / base)


def test_progressive_collects_task_gradients_in_the_last_warm_up_epoch_only():
    # a warm-up of 0 epochs is refused with the other settings, all at once (#31), not by the mode alone
    with pytest.raises(SettingsError, match=r"(?s)--model.lr must be a finite number > 0.*--model.similarity_epochs must be >= 1, got 0"):
        create_taps_module(backbone="test_resnet", tasks={"a": 2}, mode="progressive", similarity_epochs=0, lr=-1.0)
    mode = create_mode("progressive", {**HP, "similarity_epochs": 2, "similarity_batches": 3})
    ungrouped, grouped = types.SimpleNamespace(grouped=False), types.SimpleNamespace(grouped=True)
    collecting = [(epoch, batch) for epoch in range(4) for batch in range(5)
                  if mode.collects_gradients(ungrouped, epoch, batch)]
    assert collecting == [(1, 0), (1, 1), (1, 2)]
    assert not any(mode.collects_gradients(grouped, 1, batch) for batch in range(5))  # grouped once: done
    for name in ("incremental", "memory_efficient", "linear"):
        assert not create_mode(name, HP).collects_gradients(ungrouped, 0, 0)
