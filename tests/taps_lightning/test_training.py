"""TapsModule with Lightning: every mode, resume equality, bf16, DDP (gloo) and bad input."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TinyTasks, assert_rounding_close, explicit_task_network, randomize_tasks
from taps_lightning import TapsModel, gate_states
from taps_lightning.module import MODES, TapsModule

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(backbone="test_resnet", lr=0.05, sparsity_warmup_epochs=0)


def _trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=tmp_path, deterministic=True)
    args.update(kw)
    return L.Trainer(**args)


def base_changed_keys(changed):
    return [k for k in changed if ".base_layer." in k]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_the_right_weights(mode, tmp_path):
    L.seed_everything(0)
    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, mode=mode, joint_epochs=1, **TINY)
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
    if mode == "progressive":  # frozen backbone, adapters trained, tasks grouped after the warm-up epoch
        assert not base_changed_keys(changed) and any(".lora_B." in k for k in changed)
        assert module.model.grouped and module.grouping_epoch == 0
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
    module = TapsModule(tasks={"a": 3, "b": 4}, mode="incremental", lam=lam, **TINY).double().train()
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
        module = TapsModule(tasks=data.num_classes, mode="incremental", lam=lam, **TINY)
        _trainer(tmp_path, limit_val_batches=0).fit(module, data)
        return sum(sum(gate_states(module.model, task).values()) for task in module.tasks)

    weak, strong = active_layers(0.5), active_layers(2.0)
    assert strong < weak  # same seed and data: only lambda differs


def test_scores_have_their_own_lr_and_no_weight_decay():
    """One plain SGD step (no momentum): ``s - score_lr * g`` for scores, ``p - lr * (g + wd * p)`` for the rest."""
    lr, score_lr, wd = 0.1, 0.3, 0.01
    module = TapsModule(tasks={"a": 3}, mode="joint", **{**TINY, "lr": lr}, score_lr=score_lr, weight_decay=wd,
                        momentum=0.0, scheduler="none")
    optimizer = module.configure_optimizers()
    params = dict(module.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert any(".taps_score." in n for n in params) and any(".base_layer." in n for n in params)
    for name, p in params.items():
        if not p.requires_grad:  # the norms' pre-trained templates
            expected = before[name]
        elif ".taps_score." in name:
            expected = before[name] - score_lr
        else:  # deltas, the shared base (joint mode), task norms and heads
            expected = before[name] - lr * (1 + wd * before[name])
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f"{name}: {m}")


def test_sparsity_warmup_delays_the_penalty(tmp_path):
    """The training loss itself: cross-entropy alone in the warm-up epoch, cross-entropy plus
    lambda x mean |score| per task after it, against the model and batch of that step by hand."""
    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, **{**TINY, "sparsity_warmup_epochs": 1}, lam=0.7)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = (copy.deepcopy(pl_module.model), batch, pl_module.lam_now())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, outputs["loss"].detach(), *self.before))

    _trainer(tmp_path, callbacks=[Spy()], limit_val_batches=0).fit(module, data)
    assert [epoch for epoch, *_ in seen] == [0, 0, 0, 1, 1, 1]
    for epoch, loss, model, batch, lam_now in seen:
        lam = 0.0 if epoch == 0 else 0.7
        assert lam_now == lam
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


def test_resume_equals_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Interrupt(L.Callback):  # stop after the first epoch, as a killed job would
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def run(ckpt_path=None, folder="a", interrupt=False):
        L.seed_everything(0)
        data = TinyTasks.make(n=32)
        module = TapsModule(tasks=data.num_classes, mode="joint", **TINY)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)] + ([Interrupt()] if interrupt else [])
        trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer

    straight, t_straight = run(folder="straight")
    _, t_first = run(folder="split", interrupt=True)
    assert t_first.current_epoch == 1
    resumed, t_resumed = run(ckpt_path=str(tmp_path / "split" / "last.ckpt"), folder="split")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert t_straight.callback_metrics["val/acc"] == t_resumed.callback_metrics["val/acc"]
    # the checkpoint loads with weights_only=True (no pickled code)
    torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    """bf16 autocast: parameters and score gradients stay fp32, and the first step's score gradients
    are those of plain autocast through explicit weights (bf16 dL/dw, reduced with delta in fp32)."""

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                self.model, self.batch = copy.deepcopy(pl_module.model), batch

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 0:
                self.grads = {t: {n: layer.taps_score[t].grad for n, layer in pl_module.model.taps_layers()}
                              for t in pl_module.tasks}

    L.seed_everything(0)
    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, mode="joint", **TINY)
    randomize_tasks(module.model)  # non-zero deltas: the score gradient has a cross-entropy part
    first = FirstStep()
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_epochs=1, callbacks=[first])
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for _, layer in module.model.taps_layers():
        assert layer.taps_score["a"].dtype == torch.float32
        assert layer.taps_delta["a"].dtype == torch.float32

    # the reference: plain autocast autograd through explicit weights w_base + I*delta, then
    # dL/ds = <dL/dw, delta> + lam/L * sign(s) by hand (the fp32 accumulation of bf16 dL/dw)
    lam, n_layers = module.hparams.lam, len(first.model.gated_names)
    for task, (x, y) in first.batch.items():
        network, weights = explicit_task_network(first.model, task)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(network.train()(x), y).backward()
        layers = dict(first.model.taps_layers())
        grad_w = {n: weights[n].grad.double() for n in weights}
        delta = {n: layers[n].taps_delta[task].detach().double() for n in weights}
        penalty = {n: lam / n_layers * float(torch.sign(layers[n].taps_score[task].detach())) for n in weights}
        expected = torch.tensor([float((grad_w[n] * delta[n]).sum()) + penalty[n] for n in weights])
        magnitude = torch.tensor([float((grad_w[n].abs() * delta[n].abs()).sum()) + abs(penalty[n]) for n in weights])
        grads = [first.grads[task][n] for n in weights]
        assert all(g is not None and g.dtype == torch.float32 for g in grads), task
        # the same bf16 dL/dw (exact in fp32) reduced with delta in fp32 in another order: each
        # within the rounding of its sum of products (plus the penalty term), scaled to their magnitude
        for n, got, want, size in zip(weights, grads, expected, magnitude):
            assert_rounding_close(got, want, size, terms=delta[n].numel() + 1, msg=f"{task} {n}")


def test_bad_configuration_is_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'jointt'; choose one of incremental, joint"):
        TapsModule(tasks={"a": 2}, mode="jointt")
    with pytest.raises(ValueError, match="unknown backbone 'resnet5O'"):
        TapsModule(backbone="resnet5O", tasks={"a": 2})
    with pytest.raises(ValueError, match="no tasks"):
        TapsModule(backbone="test_resnet")
    data = TinyTasks.make()
    module = TapsModule(tasks={"a": 4, "b": 7}, **TINY)  # b has 3 classes in the data
    with pytest.raises(ValueError, match=r"disagree with the data's \{'a': 4, 'b': 3\}"):
        _trainer(tmp_path).fit(module, data)


def test_nan_loss_stops_with_step_and_task(tmp_path):
    data = TinyTasks.make(nan_task="b")
    module = TapsModule(tasks=data.num_classes, **TINY)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, global step 0, batch 0, task\(s\) \['b'\]"):
        _trainer(tmp_path).fit(module, data)


def test_checkpoint_from_another_setup_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, **TINY)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, data)
    other = TapsModule(tasks=data.num_classes, **{**TINY, "backbone": "test_efficientnet"})
    with pytest.raises(ValueError, match="checkpoint was trained with backbone='test_resnet'.*test_efficientnet"):
        _trainer(tmp_path, max_epochs=2).fit(other, data, ckpt_path=str(tmp_path / "last.ckpt"))


def _run_cli(args, tmp_path, timeout=600):
    env = {**os.environ, "TAPS_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.fit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


QUICK = ["--trainer.max_epochs", "1", "--data.max_train_per_task", "48", "--data.batch_size", "16",
         "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]


@pytest.mark.slow
def test_cli_default_runs_offline_and_resumes(tmp_path):
    first = _run_cli(QUICK, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "backbone=mobilenetv2_100 mode=incremental" in out
    assert "| mnist_m |" in out and "tensorboard --logdir" in out
    run = tmp_path / "logs" / "taps" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "report.md").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "adapters").iterdir()) == [
        "mnist.safetensors", "mnist_m.safetensors", "sketch.safetensors", "uci_digits.safetensors"]
    resumed = _run_cli(QUICK[:1] + ["2"] + QUICK[2:] + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "logs" / "taps" / "version_1").exists()  # continued in the same run folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["joint", "progressive"])
def test_cli_ddp_gloo_two_processes(mode, tmp_path):
    args = QUICK + ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.backbone", "test_resnet", "--model.weights", "null", "--model.mode", mode,
                    "--data.tasks", "[mnist, sketch]"]
    if mode == "progressive":
        args[1] = "2"  # a warm-up epoch, then grouped adapters
        args += ["--model.num_stages", "2", "--model.similarity_batches", "1"]
    result = _run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "x2" in out and "| sketch |" in out
    if mode == "progressive":
        assert "ddp_find_unused_parameters_true" in out and "progressive adapters grouped" in out


@pytest.mark.slow
def test_ddp_evaluation_counts_every_sample_once(tmp_path):
    """2 gloo processes on 11 samples per task: each is evaluated once (a padding sampler would give 12)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_eval_counts.py"), "11", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("COUNTS "))
    assert json.loads(line[len("COUNTS "):]) == {"val/a": 11, "val/b": 11, "test/a": 11, "test/b": 11}


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_resolves(config):
    from experiments.fit import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_cosine_schedule_restarts_for_the_taps_phase():
    from taps_lightning.module import cosine_restart

    assert cosine_restart(0, 0, 100) == 1.0 and cosine_restart(50, 0, 100) == pytest.approx(0.5)
    assert cosine_restart(100, 0, 100) == pytest.approx(0.0)
    assert cosine_restart(20, 40, 100) == pytest.approx(0.5)  # middle of the joint phase
    assert cosine_restart(40, 40, 100) == 1.0  # the TAPS phase starts at the full rate
    assert cosine_restart(70, 40, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("scheduler", ["cosine_step", "cosine"])
def test_memory_efficient_cosine_restarts_at_full_rate_when_the_taps_phase_starts(scheduler, tmp_path):
    """2 joint epochs then 3 of TAPS, 3 optimizer steps an epoch (24 samples, batches of 8): the
    learning rate of every step (``cosine_step``) or epoch (``cosine``) follows a cosine from the
    full rate over the joint phase, and a second one from the full rate again at step
    joint_epochs x steps_per_epoch = 6 (epoch 2), written out here."""
    import math

    data = TinyTasks.make(n=24, batch_size=8)
    module = TapsModule(tasks=data.num_classes, mode="memory_efficient", joint_epochs=2, scheduler=scheduler,
                        **{**TINY, "lr": 0.2}, score_lr=0.3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    _trainer(tmp_path, max_epochs=5, limit_val_batches=0, callbacks=[Spy()]).fit(module, data)
    steps_per_epoch = 3
    assert [epoch for epoch, _ in seen] == [e for e in range(5) for _ in range(steps_per_epoch)]

    def cosine(i, length):
        return 0.5 * (1 + math.cos(math.pi * i / length))

    if scheduler == "cosine_step":
        boundary, total = 2 * steps_per_epoch, 5 * steps_per_epoch
        factors = [cosine(i, boundary) if i < boundary else cosine(i - boundary, total - boundary)
                   for i in range(total)]
    else:  # once per epoch: every step of an epoch at that epoch's rate
        factors = [cosine(e, 2) if e < 2 else cosine(e - 2, 3) for e in range(5) for _ in range(steps_per_epoch)]
    expected = [rate * f for f in factors for rate in (0.2, 0.3)]  # the weights, and the scores' own rate
    assert [lr for _, lrs in seen for lr in lrs] == pytest.approx(expected, abs=1e-12)
    first_taps_step = 2 * steps_per_epoch
    assert seen[first_taps_step][1] == pytest.approx([0.2, 0.3], abs=1e-12)  # back to the full rate
    assert seen[first_taps_step - 1][1][0] < 0.2 * 0.9  # and not before


def test_authors_recipe_preset_step_equals_their_loop(tmp_path):
    """configs/authors_recipe.yaml through Lightning (accumulate_grad_batches, averaged gradients,
    its lr) against the authors' train_sequential.py loop written out: 8 batches' summed gradients,
    ``lam * sum|s| / 52 + CE``, plain-momentum SGD at their lr, one step per 8 batches."""
    import copy

    import torch.nn.functional as F
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "authors_recipe.yaml").read_text())
    model_cfg, accumulate = cfg["model"], cfg["trainer"]["accumulate_grad_batches"]
    assert accumulate == 8 and model_cfg["nesterov"] is False
    assert model_cfg["weight_decay"] == 0 and model_cfg["score_lr"] is None
    their_lr, lam = 0.01, model_cfg["lam"]  # their options.py default --lr

    keys = ("lam", "threshold", "score_init", "penalty_divisor", "lr", "momentum", "nesterov", "weight_decay",
            "score_lr", "scheduler", "cosine_epochs")
    data = TinyTasks.make(tasks=("a",), classes=(4,), n=64, batch_size=4)
    L.seed_everything(0)
    module = TapsModule(backbone="test_resnet", tasks=data.num_classes, mode="incremental",
                        **{k: model_cfg[k] for k in keys}, sparsity_warmup_epochs=0)  # penalty on from the start
    theirs = copy.deepcopy(module.model)
    initial = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    batches = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append([t.clone() for t in batch["a"]])

    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2 * accumulate, limit_val_batches=0,
                       accumulate_grad_batches=accumulate, callbacks=[Record()])
    trainer.fit(module, data)
    assert trainer.global_step == 2 and len(batches) == 16  # two optimizer steps: momentum is exercised

    theirs.train().set_task("a")
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, their_lr, momentum=model_cfg["momentum"], weight_decay=0.0)
    for i, (x, y) in enumerate(batches):
        scores = [layer.taps_score["a"] for _, layer in theirs.taps_layers()]
        loss = lam * sum(abs(s) for s in scores) / 52 + F.cross_entropy(theirs(x), y)
        loss.backward()
        if (i + 1) % 8 == 0:
            optimizer.step()
            optimizer.zero_grad()
    ours = dict(module.model.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=1e-5, atol=1e-7, msg=name)
    moved = {n.split(".")[-2] if "taps_" in n else n.split(".")[0] for n, p in theirs.named_parameters()
             if not torch.equal(p, initial[n])}
    assert {"taps_delta", "taps_score", "heads"} <= moved  # the steps changed every kind of parameter


def test_per_epoch_cosine_is_their_cosine_annealing(tmp_path):
    """``scheduler cosine`` + ``cosine_epochs`` = torch's CosineAnnealingLR(T_max) stepped once per
    epoch, run one epoch past T_max as the authors do (that epoch at lr 0)."""
    data = TinyTasks.make(tasks=("a",), classes=(4,), n=8, batch_size=4)
    module = TapsModule(tasks=data.num_classes, **TINY, scheduler="cosine", cosine_epochs=3)
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[Spy()]).fit(module, data)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], TINY["lr"])
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=3)
    expected = []
    for _ in range(4):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        annealing.step()
    assert seen == pytest.approx(expected, abs=1e-12) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"--model.cosine_epochs must be an integer >= 1 .*got 0"):
        TapsModule(tasks=data.num_classes, **TINY, cosine_epochs=0)
    with pytest.raises(ValueError, match=r"--model.penalty_divisor must be > 0 .*got -52"):
        TapsModule(tasks=data.num_classes, **TINY, penalty_divisor=-52)


def test_fit_normalises_inputs_as_the_backbone_expects(tmp_path, monkeypatch):
    """The DataModule gets the timm model's own mean/std (0.5 for test_vit, ImageNet's for resnet18)."""
    import timm

    from datamodules import MultiTaskDataModule
    from experiments.fit import TapsCLI

    monkeypatch.chdir(tmp_path)
    means = []
    for backbone in ("test_vit", "resnet18"):
        cli = TapsCLI(TapsModule, MultiTaskDataModule, subclass_mode_data=True, run=False,
                      args=["--model.backbone", backbone, "--model.weights", "null"])
        cfg = timm.create_model(backbone).pretrained_cfg
        white = cli.datamodule._transform(train=False)(torch.full((3, 8, 8), 255, dtype=torch.uint8))
        expected = [(1 - m) / s for m, s in zip(cfg["mean"], cfg["std"])]
        torch.testing.assert_close(white[:, 0, 0], torch.tensor(expected))
        means.append(tuple(cfg["mean"]))
    assert means == [(0.5, 0.5, 0.5), (0.485, 0.456, 0.406)]
