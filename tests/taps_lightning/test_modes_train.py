"""What each mode trains in a real fit (which weights move, memory-efficient's two phases), the
training step's score gradient (straight-through estimate plus the weighted penalty), what lambda
does to the gates, and the sparsity warm-up, on the training loss itself."""
import copy
import math

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TINY, TinyTasks, assert_rounding_close, randomize_tasks
from helpers import cpu_trainer as _trainer
from taps_lightning import gate_states
from taps_lightning.training.modes import MODES
from taps_lightning.training.compose import create_taps_module


def base_changed_keys(changed):
    return [k for k in changed if ".base_layer." in k]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_the_right_weights(mode, tmp_path):
    L.seed_everything(0)
    data = TinyTasks.make()
    flags = dict(TINY, joint_epochs=1)
    if mode == "lora":  # refuses a gate flag it would not read
        del flags["sparsity_warmup_epochs"]
    module = create_taps_module(tasks=data.num_classes, mode=mode, **flags)
    before = _snapshot(module)

    class FirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.state = _snapshot(pl_module)

    first_epoch = FirstEpoch()
    trainer = _trainer(tmp_path, callbacks=[first_epoch])
    trainer.fit(module, data)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # trained weights, not BatchNorm statistics (those move in any backbone run in train mode)
    changed_params = changed & {f"model.{n}" for n, _ in module.model.named_parameters()}
    if mode == "lora":  # frozen backbone, each task's PEFT adapters trained
        assert not base_changed_keys(changed) and all(any(f".lora_B.{t}." in k for k in changed) for t in "ab")
    if mode == "progressive":  # frozen backbone, adapters trained, tasks grouped after the warm-up epoch
        assert not base_changed_keys(changed) and any(".lora_B." in k for k in changed)
        assert module.model.grouped and module.mode.grouping_epoch == 0
    metrics = trainer.callback_metrics
    assert {"val/a/acc", "val/b/acc", "val/acc", "train/loss"} <= set(metrics)
    assert any(k.startswith("model.heads.a.") for k in changed) and any(k.startswith("model.heads.b.") for k in changed)
    base_changed = bool(base_changed_keys(changed))
    if mode == "incremental":
        assert not base_changed and any(".taps_delta." in k for k in changed)
    elif mode in ("joint", "memory_efficient"):
        assert base_changed and any(".taps_delta." in k for k in changed)
    if mode == "memory_efficient":  # epoch 0 trained the base jointly, epoch 1 was incremental TAPS on it
        assert module.model.freeze_base
        mid = first_epoch.state
        joint_phase = {k for k in before if not torch.equal(before[k], mid[k])}
        taps_phase = {k for k in mid if not torch.equal(mid[k], after[k])}
        assert base_changed_keys(joint_phase) and not base_changed_keys(taps_phase)
        assert not any(".taps_delta." in k or ".taps_score." in k for k in joint_phase)
        assert any(".taps_delta." in k for k in taps_phase) and any(".taps_score." in k for k in taps_phase)
    if mode == "linear":
        assert changed == {k for k in changed if k.startswith("model.heads.")}
    if mode == "finetune":  # each task's own copy is trained
        for task in ("a", "b"):
            assert any(k.startswith(f"model.backbones.{task}.") for k in changed_params)
        assert module.task_cost("a")["fraction"] > 1.0
    if mode == "joint_finetune":  # one shared backbone, trained by the tasks together
        assert any(k.startswith("model.backbone.") and k.endswith(".weight") for k in changed_params)
        features = timm.create_model("test_resnet", num_classes=0).num_features
        assert module.task_cost("a")["task_params"] == features * 4 + 4  # a task stores only its head
    if mode in ("incremental", "joint"):
        assert metrics["val/a/active_layers"] == sum(gate_states(module.model, "a").values())


def _ce_derivative_along_delta(model, task, x, y, layer, eps=1e-6):
    """``d/de CE(w + e * delta)`` at ``e = 0`` by central differences (no autograd; use float64):
    the straight-through score gradient ``<dL/dw, delta>``, whether the layer is on or off."""
    weight, delta = layer.base_layer.weight, layer.taps_delta[task].detach()
    saved = weight.detach().clone()
    losses = []
    with torch.no_grad():
        for e in (eps, -eps):
            weight.copy_(saved + e * delta)
            losses.append(F.cross_entropy(model(x, task), y).item())
        weight.copy_(saved)
    return (losses[0] - losses[1]) / (2 * eps)


def _expected_score_grads(model, batch, lam) -> dict[str, torch.Tensor]:
    """``{task: [<dCE/dw, delta> + lam/L * sign(s) for each layer]}`` by hand, in float64."""
    expected = {}
    layers = [layer for _, layer in model.taps_layers()]
    for task, (x, y) in batch.items():
        expected[task] = torch.tensor([_ce_derivative_along_delta(model, task, x, y, layer)
                                       + lam / len(layers) * torch.sign(layer.taps_score[task]).item()
                                       for layer in layers], dtype=torch.float64)
    return expected


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_score_gradient_is_ste_plus_weighted_penalty():
    """One training step: ``dL/ds = <dCE/dw, delta> + lam/L * sign(s)`` for every layer of every task."""
    lam = 0.7
    torch.manual_seed(0)
    module = create_taps_module(tasks={"a": 3, "b": 4}, mode="incremental", lam=lam, **TINY).double().train()
    plain = timm.create_model("test_resnet", num_classes=0)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in plain.modules())
    assert n_layers == len(module.model.gated_names)
    randomize_tasks(module.model)  # random deltas, and norms whose zero-initialised scales let every layer matter
    with torch.no_grad():  # some layers on, some off, some with a negative score
        for i, (_, layer) in enumerate(module.model.taps_layers()):
            for j, task in enumerate(("a", "b")):
                layer.taps_score[task].fill_((0.3, 0.05, -0.2)[(i + j) % 3])
    batch = {t: (torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])) for t in ("a", "b")}

    total = module.training_step(batch, 0)
    total.backward()

    scores = {t: torch.stack([layer.taps_score[t].detach() for _, layer in module.model.taps_layers()])
              for t in ("a", "b")}
    expected = _expected_score_grads(module.model, batch, lam)
    for task in batch:
        got = torch.stack([layer.taps_score[task].grad for _, layer in module.model.taps_layers()])
        torch.testing.assert_close(got, expected[task], rtol=1e-5, atol=1e-6, msg=lambda m: f"{task}: {m}")
    with torch.no_grad():  # the loss is cross-entropy plus lam x the mean |score|, per task
        ce = sum(F.cross_entropy(module.model(x, t), y) for t, (x, y) in batch.items())
    penalty = sum(scores[t].abs().sum() for t in ("a", "b")) / n_layers
    torch.testing.assert_close(total.detach(), ce + lam * penalty)


def test_more_lambda_switches_more_layers_off(tmp_path):
    def active_layers(lam):
        L.seed_everything(0)
        data = TinyTasks.make()
        module = create_taps_module(tasks=data.num_classes, mode="incremental", lam=lam, **TINY)
        _trainer(tmp_path, limit_val_batches=0).fit(module, data)
        return sum(sum(gate_states(module.model, task).values()) for task in module.tasks)

    weak, strong = active_layers(0.5), active_layers(2.0)
    assert strong < weak  # same seed and data: only lambda differs


def test_sparsity_warmup_delays_the_penalty(tmp_path):
    """The training loss itself: cross-entropy alone in the warm-up epoch, cross-entropy plus
    lambda x mean |score| per task after it, against the model and batch of that step by hand."""
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **{**TINY, "sparsity_warmup_epochs": 1}, lam=0.7)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = (copy.deepcopy(pl_module.model), batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, outputs["loss"].detach(), *self.before))

    _trainer(tmp_path, callbacks=[Spy()], limit_val_batches=0).fit(module, data)
    assert [epoch for epoch, *_ in seen] == [0, 0, 0, 1, 1, 1]
    for epoch, loss, model, batch in seen:
        lam = 0.0 if epoch == 0 else 0.7
        ce = penalty = 0.0
        with torch.no_grad():
            for task, (x, y) in batch.items():
                ce += float(F.cross_entropy(model.train()(x, task), y))  # the step's own forward, repeated
                scores = [abs(layer.taps_score[task].item()) for _, layer in model.taps_layers()]
                penalty += math.fsum(scores) / len(scores)
        assert penalty > 0.1  # so the penalty term (0.7 x this) is far above the rounding allowed
        # two tasks' cross-entropies plus lambda x (a sum of L scores / L): the terms are positive
        assert_rounding_close(loss, torch.tensor(ce + lam * penalty), ce + lam * penalty,
                              terms=len(model.gated_names) + 4, msg=f"epoch {epoch}")
