"""The recomputing gated layers (``taps_lightning.fused``) against explicit arithmetic, and
what they keep for backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import explicit_task_network, randomize_tasks, single_task_layer, tiny_resnet

TAU = 0.1

LAYERS = {
    "conv2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True),
    "conv2d_groups_dilation": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
    "conv2d_reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False),
    "linear": lambda: nn.Linear(4, 6),
}
INPUTS = {"conv2d": (2, 4, 9, 9), "conv2d_groups_dilation": (2, 4, 7, 7), "conv2d_reflect": (2, 4, 6, 6),
          "conv1d": (2, 4, 11), "conv3d": (1, 4, 4, 5, 5), "linear": (2, 3, 4)}


def _explicit(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's own maths written out with ``w`` as the weight (bias detached)."""
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Linear):
        return x @ w.t() + bias
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return conv(x, w, bias, layer.stride, padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("train_base", [True, False])
def test_outputs_and_gradients_match_explicit_weight(kind, on, train_base):
    torch.manual_seed(0)
    module = LAYERS[kind]()
    module.weight.requires_grad_(train_base)
    layer = single_task_layer(module, TAU)
    delta, score = layer.taps_delta["t"], layer.taps_score["t"]
    with torch.no_grad():
        delta.normal_()
        score.fill_(0.4 if on else 0.02)
    x = torch.randn(INPUTS[kind], requires_grad=True)

    out = layer(x)
    assert out.grad_fn is not None and "GatedLayer" in type(out.grad_fn).__name__  # the fused path ran
    upstream = torch.randn_like(out)
    out.backward(upstream)

    x_ref = x.detach().clone().requires_grad_(True)
    w = (module.weight.detach() + (delta.detach() if on else 0)).requires_grad_(True)
    expected = _explicit(module, x_ref, w)
    torch.testing.assert_close(out, expected)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(delta.grad, w.grad if on else torch.zeros_like(w))
    torch.testing.assert_close(score.grad, (w.grad * delta.detach()).sum())
    if train_base:
        torch.testing.assert_close(module.weight.grad, w.grad)
        assert module.weight.grad.data_ptr() != delta.grad.data_ptr()
    else:
        assert module.weight.grad is None
    if module.bias is not None:
        dims = [d for d in range(upstream.dim()) if d != (upstream.dim() - 1 if kind == "linear" else 1)]
        torch.testing.assert_close(module.bias.grad, upstream.sum(dims))


def _saved_weight_sized(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Tensors autograd keeps for backward that have the weight's shape but are not a parameter."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum()
    params = {p.data_ptr() for p in layer.parameters()}
    shape = layer.base_layer.weight.shape
    return [t for t in saved if t.shape == shape and t.data_ptr() not in params]


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_recompute_keeps_no_weight_copy_for_backward(kind):
    layer = single_task_layer(LAYERS[kind](), TAU)
    x = torch.randn(INPUTS[kind], requires_grad=True)
    assert _saved_weight_sized(layer, x) == []
    layer.config.recompute_weight = False  # composing the weight first keeps ``base + delta`` alive
    assert len(_saved_weight_sized(layer, x)) == 1


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    module = nn.Conv2d(4, 6, 3, padding=1)
    layer = single_task_layer(module, TAU)
    delta, score = layer.taps_delta["t"], layer.taps_score["t"]
    with torch.no_grad():
        delta.normal_(0, 0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == delta.grad.dtype == score.grad.dtype == torch.float32

    x_ref = x.detach().clone().requires_grad_(True)
    w = (module.weight.detach() + delta.detach()).requires_grad_(True)
    F.conv2d(x_ref, w, module.bias.detach(), padding=1).square().sum().backward()
    torch.testing.assert_close(delta.grad, w.grad, atol=0.15, rtol=0.05)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0.15, rtol=0.05)
    torch.testing.assert_close(score.grad, (w.grad * delta.detach()).sum(), atol=0.2, rtol=0.05)


@pytest.mark.parametrize("recompute", [True, False])
def test_whole_model_gradients_match_explicit_weights(recompute):
    """A ResNet-18 training step (joint mode, some layers off), with and without recomputing the
    weight, against autograd through explicit leaf weights ``w = w_base + I*delta``:
    ``dL/dw_base = dL/dw``, ``dL/ddelta = I dL/dw``, ``dL/ds = <dL/dw, delta>``; norms and head as usual."""
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    off = ("layer1.0.conv1", "layer3.1.conv2")
    model = tiny_resnet({"a": 3}, recompute_weight=recompute, freeze_base=False)
    assert all(layer.recompute_weight is recompute for _, layer in model.taps_layers())
    randomize_tasks(model, off=off)
    model.train()
    network, weights = explicit_task_network(model, "a")
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(network.train()(x), y).backward()

    close = dict(atol=1e-5, rtol=1e-4)
    for name, layer in model.taps_layers():
        dw, delta = weights[name].grad, layer.taps_delta["a"].detach()
        torch.testing.assert_close(layer.base_layer.weight.grad, dw, msg=lambda m: f"{name} base: {m}", **close)
        torch.testing.assert_close(layer.taps_delta["a"].grad, torch.zeros_like(dw) if name in off else dw,
                                   msg=lambda m: f"{name} delta: {m}", **close)
        torch.testing.assert_close(layer.taps_score["a"].grad, (dw * delta).sum(),
                                   msg=lambda m: f"{name} score: {m}", **close)
    for name, norm in model.task_norms():
        explicit = dict(network[0].get_submodule(name).named_parameters())
        for key, p in norm.norms["a"].named_parameters():
            torch.testing.assert_close(p.grad, explicit[key].grad, msg=lambda m: f"{name}.{key}: {m}", **close)
    for key, p in model.heads["a"].named_parameters():
        torch.testing.assert_close(p.grad, dict(network[1].named_parameters())[key].grad, **close)
