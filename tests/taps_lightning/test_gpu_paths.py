"""What a GPU user runs, exercised on the CPU: fp16 autocast with a ``GradScaler`` through the
gated layers (plain torch and Lightning's 16-mixed plugin), channels_last models, and
``torch.compile``. References are written out with explicit weights ``w = w_base + I * delta``."""
import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import taps_lightning as tl
from taps_lightning.core.gate import _dot
from taps_lightning.training.compose import create_taps_module
from tests.helpers import TinyTasks, assert_rounding_close, randomize_tasks, single_task_layer, taps_trainer, tiny_resnet

TAU = 0.1


def _gated_net() -> nn.Sequential:
    """An active conv, an inactive conv and an active linear, each a fused TAPS layer."""
    torch.manual_seed(0)
    layers = [single_task_layer(m, TAU) for m in (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2),
                                                   nn.Linear(8 * 3 * 3, 5))]
    with torch.no_grad():
        for layer, score in zip(layers, (0.3, 0.02, 0.5)):
            layer.taps_delta["t"].normal_(0, 0.1)
            layer.taps_score["t"].fill_(score)
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), nn.Flatten(), layers[2])


def _reference_grads(net: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp32 ``(dL/ddelta, dL/ds)`` of each gated layer from explicit weights: ``I * dL/dw`` and
    ``<dL/dw, delta>``, with ``L = mean(out^2)``."""
    gated = [m for m in net if isinstance(m, tl.TapsLayer)]
    weights = [(m.base_layer.weight.detach() + (m.taps_delta["t"].detach() if m.is_active("t") else 0)).requires_grad_()
               for m in gated]
    h = x
    for module in net:
        if isinstance(module, tl.TapsLayer):
            w, base = weights[gated.index(module)], module.base_layer
            h = F.linear(h, w, base.bias) if isinstance(base, nn.Linear) else F.conv2d(
                h, w, base.bias, base.stride, base.padding)
        else:
            h = module(h)
    h.square().mean().backward()
    return [(w.grad * float(m.is_active("t")), (w.grad * m.taps_delta["t"].detach()).sum())
            for m, w in zip(gated, weights)]


def _assert_fp16_close(net: nn.Sequential, expected, scale: float) -> None:
    """Delta and score gradients equal ``scale *`` the fp32 ones within fp16 accuracy: about 1 %
    of the largest gradient, and for the score 1 % of ``|dL/dw| |delta|`` (Cauchy-Schwarz)."""
    for layer, (grad_delta, grad_score) in zip([m for m in net if isinstance(m, tl.TapsLayer)], expected):
        delta, score = layer.taps_delta["t"], layer.taps_score["t"]
        assert delta.grad.dtype == score.grad.dtype == torch.float32
        torch.testing.assert_close(delta.grad, scale * grad_delta, rtol=0.01,
                                   atol=0.01 * scale * float(grad_delta.abs().max()))
        if layer.is_active("t"):  # grad_delta is dL/dw
            bound = 0.01 * scale * float(grad_delta.norm() * delta.detach().norm())
            assert abs(float(score.grad) - scale * float(grad_score)) <= bound
        else:  # an inactive layer: no delta gradient, but the score still gets one
            assert torch.equal(delta.grad, torch.zeros_like(delta)) and float(score.grad) != 0.0


def _scaled_step(net, x, scaler, optimizer):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = net(x)
    assert out.dtype == torch.float16
    loss = out.float().square().mean()
    scaler.scale(loss).backward()
    return loss


def _task_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if "taps_" in n}


def test_fp16_grad_scaler_scales_unscales_and_skips_through_the_gated_layers():
    net = _gated_net()
    x = torch.randn(4, 3, 8, 8)
    expected = _reference_grads(copy.deepcopy(net), x)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    _scaled_step(net, x, scaler, optimizer)
    _assert_fp16_close(net, expected, scale=2.0 ** 10)  # (a) the scaled backward
    scaler.unscale_(optimizer)
    _assert_fp16_close(net, expected, scale=1.0)  # (b) unscale_ reached deltas and scores
    before = _task_state(net)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if "taps_" in n}
    scaler.step(optimizer)
    scaler.update()
    for name, p in net.named_parameters():
        if "taps_" in name:  # SGD without momentum: p - lr * unscaled grad
            torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name])
    assert scaler.get_scale() == 2.0 ** 10

    # (c) an inf in the input: the step is skipped, nothing moves, the scale halves
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    before = _task_state(net)
    _scaled_step(net, bad, scaler, optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in _task_state(net).items())
    assert scaler.get_scale() == 2.0 ** 9

    # (c) overflow only in fp16 backward (finite loss, scale too large): skipped the same way
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    assert torch.isfinite(_scaled_step(net, x, scaler, optimizer))
    assert not all(bool(torch.isfinite(p.grad).all()) for n, p in net.named_parameters() if "taps_" in n)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in _task_state(net).items())
    assert scaler.get_scale() == 2.0 ** 39


def _trainer(tmp_path, steps: int, fp16_scale: float | None = None) -> L.Trainer:
    """fp32, or Lightning's fp16 AMP plugin with a ``GradScaler`` on the CPU. The plugin (the one
    a GPU run gets) is passed explicitly: Lightning turns ``precision="16-mixed"`` on a CPU into
    bf16-mixed."""
    plugins = [] if fp16_scale is None else [
        MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=fp16_scale))]
    return taps_trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=tmp_path, plugins=plugins)


def test_lightning_16_mixed_skips_overflowing_steps_and_unscales_updates(tmp_path):
    def module():
        torch.manual_seed(0)
        return create_taps_module(tasks=data.num_classes, backbone="test_resnet", lr=0.05, momentum=0.0,
                          sparsity_warmup_epochs=0, scheduler="none")

    data = TinyTasks.make()
    before = _task_state(module())

    overflowing = module()  # the first step of a 2**40 scale overflows fp16: skipped, scale halved
    trainer = _trainer(tmp_path, steps=1, fp16_scale=2.0 ** 40)
    trainer.fit(overflowing, data)  # its loss is finite: TapsModule's non-finite loss stop stays out of the way
    assert trainer.precision == "16-mixed" and trainer.global_step == 1
    assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 39
    assert all(torch.equal(p, before[n]) for n, p in _task_state(overflowing).items())

    def updates(trainer):
        L.seed_everything(0)
        trained = module()
        trainer.fit(trained, data)
        return {n: p - before[n] for n, p in _task_state(trained).items()}

    def relative(a, b, kind):
        a, b = (torch.cat([u[n].reshape(-1) for n in u if kind in n]) for u in (a, b))
        assert b.norm() > 0
        return float((a - b).norm() / b.norm())

    # Scales are powers of two, exact in fp16: two scales give the same updates (to rare underflows)
    # only if every delta and score gradient is unscaled; a missed one would differ 16-fold.
    # Two steps: in the second the deltas are non-zero, so the scores get <dL/dw, delta> too.
    by_scale = [updates(_trainer(tmp_path, steps=2, fp16_scale=scale)) for scale in (2.0 ** 10, 2.0 ** 14)]
    for kind in (".taps_delta.", ".taps_score."):
        assert relative(*by_scale, kind) < 0.01
    # and the fp16 step is the fp32 one, to fp16's accuracy through a ResNet (about 5 % here)
    fp16, fp32 = updates(_trainer(tmp_path, steps=1, fp16_scale=2.0 ** 10)), updates(_trainer(tmp_path, steps=1))
    assert relative(fp16, fp32, ".taps_delta.") < 0.15


class _CopyCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_score_gradient_of_channels_last_weights_is_exact_and_copies_nothing():
    a = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    b = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    # element by element in float64 (index order, not memory order), and the sum of |products|
    expected = math.fsum(float(a[i, j, k, m]) * float(b[i, j, k, m])
                         for i in range(8) for j in range(4) for k in range(3) for m in range(3))
    magnitude = math.fsum(abs(float(a[i, j, k, m]) * float(b[i, j, k, m]))
                          for i in range(8) for j in range(4) for k in range(3) for m in range(3))
    with _CopyCounter() as counter:
        got = _dot(a, b)
    assert counter.copies == 0
    assert_rounding_close(got, torch.tensor(expected), magnitude, terms=a.numel())
    assert_rounding_close(_dot(a, b.contiguous()), torch.tensor(expected), magnitude,  # mixed layouts: one copy
                          terms=a.numel())


@pytest.mark.parametrize("recompute", [True, False])
def test_channels_last_model_trains_saves_loads_and_merges_like_a_contiguous_one(recompute, tmp_path):
    ref = tiny_resnet({"a": 3, "b": 4}, freeze_base=False, recompute_weight=recompute)
    randomize_tasks(ref, off=("layer1.0.conv1", "layer3.1.conv2"))
    cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    cl.add_task("c", 2)  # added after the conversion: its deltas follow the base's layout
    for name, layer in cl.taps_layers():
        if layer.base_layer.weight.dim() == 4:
            for task in ("a", "c"):
                assert layer.taps_delta[task].is_contiguous(memory_format=torch.channels_last), (name, task)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    outs = []
    for model, inp in ((ref, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        model.train()
        out = model(inp, "a")
        F.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    cl_params = dict(cl.named_parameters())
    for name, p in ref.named_parameters():
        q = cl_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert q.grad.stride() == q.stride(), name  # gradients land in the parameter's layout
            if ".taps_score." not in name:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()), msg=name)
    # a score gradient <dL/dw, delta> sums up to 2.4M products, and here cancels down to 1/26000 of
    # their magnitude in one layer: it is compared within 1e-5 of that magnitude (the kernels'
    # rounding through the network is ~1e-7 of it; pairing elements in the wrong order, >1e-3)
    cl_layers = dict(cl.taps_layers())
    for name, layer in ref.taps_layers():
        grad_w, delta = layer.base_layer.weight.grad.double(), layer.taps_delta["a"].detach().double()
        magnitude = float((grad_w.abs() * delta.abs()).sum())  # the base trains: its gradient is dL/dw
        difference = float(cl_layers[name].taps_score["a"].grad) - float(layer.taps_score["a"].grad)
        assert abs(difference) <= 1e-5 * magnitude, (name, difference, magnitude)

    tl.save_task(cl, "a", tmp_path / "a.safetensors")
    loaded = copy.deepcopy(ref)
    tl.load_task(loaded, tmp_path / "a.safetensors", task="a_from_cl")
    cl_loaded = copy.deepcopy(cl)
    tl.load_task(cl_loaded, tmp_path / "a.safetensors", task="a_from_cl")
    x_eval = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for model in (ref, loaded, cl_loaded):
            model.eval()
        expected = ref(x_eval, "a")
        torch.testing.assert_close(loaded(x_eval, "a_from_cl"), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cl_loaded(x_eval.contiguous(memory_format=torch.channels_last), "a_from_cl"),
                                   expected, rtol=1e-4, atol=1e-5)
        merged = tl.merge(cl, "a").eval()
        torch.testing.assert_close(merged(x_eval.contiguous(memory_format=torch.channels_last)), expected,
                                   rtol=1e-4, atol=1e-5)


def _compile_net() -> tl.TapsModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))
    model = tl.TapsModel(net, {"a": 3}, num_features=8)  # a feature extractor: nothing to strip
    randomize_tasks(model)
    # float64: the compiled kernels (inductor's C++) add in other orders than eager, and a score
    # gradient can cancel to 1/1000 of what it sums; in float64 that rounding (~1e-13) stays far
    # under the tolerance, in float32 it would not
    return model.double().train()


def _train_step(model, x, y):
    loss = F.cross_entropy(model(x, "a"), y) + 0.5 * tl.sparsity_loss(model, "a")
    loss.backward()
    return loss


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_step_matches_eager_and_follows_gate_changes(backend):
    """Dynamo traces the fused gated layers (AOTAutograd differentiates the custom autograd
    function; inductor also generates C++ for it). Reading the gates is one host sync, a graph
    break; the gates become guards, so a layer switching off recompiles instead of running stale."""
    torch._dynamo.reset()
    eager, compiled = _compile_net(), _compile_net()
    x, y = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2])
    step = torch.compile(_train_step, backend=backend)
    for switch_off in (None, compiled.layer_order()[1]):
        if switch_off:
            for model in (eager, compiled):
                with torch.no_grad():
                    model.backbone.get_submodule(switch_off).taps_score["a"].fill_(0.0)
        eager.zero_grad(), compiled.zero_grad()
        expected, got = _train_step(eager, x, y), step(compiled, x, y)
        torch.testing.assert_close(got, expected)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    off = compiled.backbone.get_submodule(switch_off)
    assert not off.is_active("a") and torch.equal(off.taps_delta["a"].grad, torch.zeros_like(off.taps_delta["a"]))
