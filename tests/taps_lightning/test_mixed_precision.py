"""bf16 autocast on CPU: parameters and score gradients stay fp32, and the score gradients are
those of plain autocast through explicit weights."""
import copy

import lightning as L
import torch
import torch.nn.functional as F

from helpers import TINY, TinyTasks, assert_rounding_close, explicit_task_network, randomize_tasks
from helpers import cpu_trainer as _trainer
from taps_lightning.training.compose import create_taps_module


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
    module = create_taps_module(tasks=data.num_classes, mode="joint", **TINY)
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
