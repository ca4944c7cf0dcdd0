"""BatchNorm re-estimation (``tl.recalibrate_norms`` and ``TapsModule.recalibrate_norms``)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

import timm
import torch
from torch import nn

import taps_lightning as tl

ROOT = Path(__file__).resolve().parents[2]


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: a bright left or right half over noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    for i, label in enumerate(y.tolist()):
        x[i, :, :, :4] += 1.5 * (1 - label)
        x[i, :, :, 4:] += 1.5 * label
    return x, y


def _accuracy(model: tl.TapsModel, x, y, batch_statistics: bool = False) -> float:
    """Eval-mode accuracy, or with every BatchNorm normalising by the statistics of the whole set
    (one batch, no running averages touched): the accuracy the weights have with exact statistics."""
    net = copy.deepcopy(model).eval()
    if batch_statistics:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
                m.running_mean = m.running_var = None
    with torch.no_grad():
        return (net(x, "t").argmax(1) == y).double().mean().item()


def _trained_with_inert_delta(first: str = "3", scale: float = 0.1) -> tl.TapsModel:
    """A small TAPS model trained on one task with the gate of layer ``first`` (the second conv)
    closed; that layer's delta is then ``(scale - 1) x`` its base weight, so opening the gate
    multiplies the layer's output by ``scale``: with batch statistics nothing changes (the next
    BatchNorm divides it out), with the stale running statistics the features shrink to the
    norm's offsets and every image gets the same class."""
    torch.manual_seed(0)
    model = tl.TapsModel(_backbone(), tasks={"t": 2}, num_features=8)
    layer = dict(model.taps_layers())[first]
    with torch.no_grad():
        layer.taps_score["t"].fill_(0.0)  # closed: its delta gets no gradient
    x, y = _data(256, seed=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % len(y)
        loss = nn.functional.cross_entropy(model(x[idx], "t"), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        layer.taps_delta["t"].copy_(layer.base_layer.weight * (scale - 1))
    return model


def test_recalibration_restores_accuracy_after_a_gate_flip():
    model = _trained_with_inert_delta()
    x_val, y_val = _data(200, seed=2)
    before = _accuracy(model, x_val, y_val)
    assert before > 0.95, "the constructed model must first be accurate"
    with torch.no_grad():
        dict(model.taps_layers())["3"].taps_score["t"].fill_(0.5)  # the gate flips on late in an epoch
    exact = _accuracy(model, x_val, y_val, batch_statistics=True)
    stale = _accuracy(model, x_val, y_val)
    assert exact > 0.95 and stale < exact - 0.3, (exact, stale)
    x_train, _ = _data(256, seed=1)
    images = tl.recalibrate_norms(model, "t", x_train.split(32)[:4])
    assert images == 128
    assert _accuracy(model, x_val, y_val) >= exact - 0.02


def test_recalibration_is_the_average_of_batch_statistics_and_touches_only_the_task():
    torch.manual_seed(0)
    model = tl.TapsModel(_backbone(), tasks={"t": 2, "u": 2}, num_features=8)
    model.train()
    with torch.no_grad():  # statistics from earlier training, which re-estimation must replace
        model(torch.randn(8, 3, 8, 8) * 3 + 1, "t")
        model(torch.randn(8, 3, 8, 8) * 3 + 1, "u")
    other = {k: v.clone() for k, v in model.state_dict().items() if ".norms.u." in k}
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    model.train()
    batches = [torch.randn(16, 3, 8, 8, dtype=torch.float64).float() * (i + 1) + i for i in range(3)]
    tl.recalibrate_norms(model, "t", batches)
    # independent arithmetic in float64: the first BatchNorm sees the first conv's output (gate on,
    # zero delta: the base convolution); its statistics are the average of each batch's mean and
    # unbiased variance
    conv = model.backbone[0].base_layer.double()
    outs = [conv(b.double()) for b in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for o in outs]).mean(0)
    conv.float()
    norm = model.backbone[1].task_norm("t")
    torch.testing.assert_close(norm.running_mean.double(), means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var.double(), variances, rtol=1e-5, atol=1e-5)
    assert int(norm.num_batches_tracked) == 3 and norm.momentum == 0.1  # momentum restored
    assert model.training and model.backbone[1].training  # modes restored
    for k, v in other.items():  # the other task's norms are untouched
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    for k, v in weights.items():  # and no weight moved
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_models_without_task_batchnorm_are_a_no_op():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = tl.TapsModel(backbone, tasks={"t": 2}, num_features=4)
    state = copy.deepcopy(model.state_dict())

    def never():
        raise AssertionError("the data must not be read")
        yield

    assert tl.recalibrate_norms(model, "t", never()) == 0
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    shared = tl.MultiHeadModel(timm.create_model("test_resnet"), {"a": 2, "b": 3}, copy_per_task=False,
                               train_backbone=True)
    assert shared.task_batchnorms("a") == []  # a shared backbone's norms belong to no one task
    copies = tl.MultiHeadModel(timm.create_model("test_resnet"), {"a": 2, "b": 3}, copy_per_task=True,
                               train_backbone=True)
    own = [m for m in copies.backbones["b"].modules() if isinstance(m, nn.BatchNorm2d)]
    assert own and [id(m) for m in copies.task_batchnorms("b")] == [id(m) for m in own]


def test_progressive_adapters_recalibrate_their_task_norms():
    torch.manual_seed(0)
    model = tl.ProgressiveAdapterModel(timm.create_model("test_resnet", num_classes=0), {"a": 2, "b": 2}, rank=2,
                                       num_stages=2)
    norms = model.task_batchnorms("a")
    assert norms and all(m.running_mean is not None for m in norms)
    before = [m.running_mean.clone() for m in norms]
    other = [m.running_mean.clone() for m in model.task_batchnorms("b")]
    images = tl.recalibrate_norms(model, "a", [torch.randn(4, 3, 32, 32) + 3 for _ in range(2)])
    assert images == 8
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(model.task_batchnorms("b"), other))


# -- in training: TapsModule ---------------------------------------------------------------------
import lightning as L  # noqa: E402

from helpers import TinyTasks, randomize_tasks, taps_trainer  # noqa: E402
from callbacks import NormRecalibration  # noqa: E402
from taps_lightning.training.compose import create_taps_module  # noqa: E402


def _fit(max_epochs=2, callbacks=(), data=None, trainer_kw=None, prepare=None, **kw):
    L.seed_everything(0)
    data = data or TinyTasks.make(n=24)
    module = create_taps_module(tasks=data.num_classes, **{"backbone": "test_resnet", "lr": 0.05,
                                                   "sparsity_warmup_epochs": 0, **kw})
    if prepare is not None:
        prepare(module)
    taps_trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              callbacks=list(callbacks), **(trainer_kw or {})).fit(module, data)
    return module


def test_recalibration_leaves_the_training_trajectory_bit_identical():
    without = _fit(recalibrate_batches=0)
    rng_without = torch.get_rng_state()
    with_it = _fit(recalibrate_batches=2)
    assert torch.equal(torch.get_rng_state(), rng_without)  # the global RNG stream is not consumed
    trained = [n for n, p in with_it.named_parameters() if p.requires_grad]
    assert trained
    for name in trained:
        assert torch.equal(with_it.get_parameter(name), without.get_parameter(name)), name
    # and it did something: the statistics differ, and were computed on 2 batches of 8 images per task
    a, b = without.model.task_batchnorms("a")[0], with_it.model.task_batchnorms("a")[0]
    assert not torch.equal(a.running_mean, b.running_mean)
    images = {name: NormRecalibration.of(m.trainer).images for name, m in (("with", with_it), ("without", without))}
    assert images == {"with": {"a": 16, "b": 16}, "without": {}}


class _StatsAtValidation(L.Callback):
    """Records, as validation starts (after the module's on_validation_start), each task's gates and
    norm statistics, and the statistics an independent re-estimation of that very model gives."""

    def __init__(self):
        self.seen = []

    def on_validation_epoch_start(self, trainer, pl_module):
        model, dm = pl_module.model, trainer.datamodule
        for task in pl_module.tasks:
            fresh = copy.deepcopy(model)
            loader = dm.norm_dataloader(task, pl_module.evaluation_settings.recalibrate_batches)
            tl.recalibrate_norms(fresh, task, [x for x, _ in loader])
            self.seen.append((trainer.current_epoch, task, model.gate_states(task),
                              [m.running_var.clone() for m in model.task_batchnorms(task)],
                              [m.running_var.clone() for m in fresh.task_batchnorms(task)],
                              pl_module.lam_policy.within(pl_module.task_fractions())))


def test_budget_enforcement_comes_before_recalibration_before_validation():
    """Validating after every batch (so enforcement happens in on_validation_start, not at an
    epoch's last batch): every validated state is within budget and its statistics are those an
    independent re-estimation gives for the enforced gates."""
    spy = _StatsAtValidation()
    # large random deltas: switching a layer off changes its task's statistics
    _fit(max_epochs=2, callbacks=[spy], budget=0.3, recalibrate_batches=2, trainer_kw={"val_check_interval": 1},
         prepare=lambda module: randomize_tasks(module.model, scale=0.3))
    assert len(spy.seen) == 2 * 3 * 2  # epochs x batches x tasks
    for epoch, task, gates, stats, independent, within in spy.seen:
        assert all(within.values()), (epoch, task)  # enforced before validation
        for s, i in zip(stats, independent):  # and the statistics are those of the enforced gates
            torch.testing.assert_close(s, i, rtol=1e-5, atol=1e-6)


def test_recalibration_before_test_and_in_the_report(tmp_path):
    from callbacks import ResultsReport

    L.seed_everything(0)
    data = TinyTasks.make(n=24)
    module = create_taps_module(tasks=data.num_classes, backbone="test_resnet", recalibrate_batches=1)
    report = ResultsReport()
    trainer = taps_trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[report])
    norm = module.model.task_batchnorms("b")[0]
    before = norm.running_mean.clone()
    trainer.test(module, data, verbose=False)
    assert not torch.equal(norm.running_mean, before)
    text = report.path.read_text()
    assert "re-estimated for these weights on 8 training images per task" in text
    assert [r["norm_images"] for r in report.rows[:-1]] == [8, 8]
    trainer = taps_trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                           default_root_dir=tmp_path, callbacks=[report], recalibrate_batches=0)
    trainer.test(module, data, verbose=False)
    assert "not re-estimated" in report.path.read_text()


def test_gate_flips_are_counted_per_task_per_epoch_and_frozen_gates_do_not_move():
    flips = []

    class Spy(L.Callback):
        """Counts gate changes between optimizer steps itself; reads what the module logged for the
        previous epoch (the module logs after the callbacks' on_train_epoch_end)."""

        def _read_logged(self, trainer, pl_module):
            if len(flips) > len(logged):
                logged.append({t: float(trainer.callback_metrics[f"taps/{t}/gate_flips"]) for t in pl_module.tasks})

        def on_train_epoch_start(self, trainer, pl_module):
            self._read_logged(trainer, pl_module)
            self.last = {t: pl_module.model.gate_tensor(t).clone() for t in pl_module.tasks}
            self.count = {t: 0 for t in pl_module.tasks}

        def on_train_batch_end(self, trainer, pl_module, *args):
            for t in pl_module.tasks:
                now = pl_module.model.gate_tensor(t)
                self.count[t] += int((now != self.last[t]).sum())
                self.last[t] = now.clone()

        def on_train_epoch_end(self, trainer, pl_module):
            flips.append(dict(self.count))

        def on_train_end(self, trainer, pl_module):
            self._read_logged(trainer, pl_module)

    logged = []
    scores = []

    class Scores(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            scores.append(pl_module.model.layer_selection()[1].clone())

    module = _fit(max_epochs=4, callbacks=[Spy(), Scores()], lam=4.0, lr=0.2, freeze_gates_epochs=2)
    assert sum(sum(c.values()) for c in flips[:2]) > 0, "the set-up must flip gates while they train"
    assert len(logged) == len(flips) == 4
    for counted, log in zip(flips, logged):
        assert log == {t: float(n) for t, n in counted.items()}
    torch.testing.assert_close(scores[3], scores[1], rtol=0, atol=0)  # the last 2 epochs: scores frozen
    assert not torch.equal(scores[1], scores[0])  # while before they moved
    assert all(sum(c.values()) == 0 for c in flips[2:])
    assert module.gates_frozen()


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_statistics(tmp_path):
    """2 gloo processes share the 3 batches per task (2 + 1): both end with the same statistics,
    equal (up to float rounding) to one process re-estimating on all 3 batches."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_recalibrate.py"), str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["images"] == ranks[1]["images"] == {"a": 24, "b": 24}
    assert ranks[0]["stats"].keys() == ranks[1]["stats"].keys()
    for key, value in ranks[0]["stats"].items():
        assert torch.equal(value, ranks[1]["stats"][key]), key
    # one process, all batches
    L.seed_everything(0)
    data = TinyTasks.make(n=24, batch_size=8)
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes, recalibrate_batches=3)
    data.setup("validate")
    for task in module.tasks:
        tl.recalibrate_norms(module.model, task, [x for x, _ in data.norm_dataloader(task, 3)])
        for i, norm in enumerate(module.model.task_batchnorms(task)):
            assert int(ranks[0]["stats"][f"{task}/{i}/num_batches_tracked"]) == 3
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(ranks[0]["stats"][f"{task}/{i}/{key}"], getattr(norm, key),
                                           rtol=1e-5, atol=1e-6)
