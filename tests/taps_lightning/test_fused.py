"""The recomputing gated layers (``taps_lightning.core.fused``) against explicit arithmetic, and
what they keep for backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_rounding_close, explicit_task_network, randomize_tasks, single_task_layer, tiny_resnet

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


def _explicit(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's own maths written out with ``w`` as the weight and ``bias`` as the bias."""
    if isinstance(layer, nn.Linear):
        return x @ w.t() + bias
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return conv(x, w, bias, layer.stride, padding, layer.dilation, layer.groups)


def _reference(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, upstream: torch.Tensor) -> dict[str, tuple]:
    """``{"out" | "x" | "w" | "bias": (exact, magnitude, terms)}``: the explicit layer and its
    gradients for ``upstream`` in float64, on absolute values (the sum of |products| of each
    result) and on ones (how many products each result sums: its rounding count)."""
    runs = []
    for f in (lambda t: t.detach().double(), lambda t: t.detach().double().abs(),
              lambda t: torch.ones_like(t, dtype=torch.float64)):
        xr, wr = f(x).requires_grad_(), f(w).requires_grad_()
        br = None if layer.bias is None else f(layer.bias).requires_grad_()
        out = _explicit(layer, xr, wr, br)
        out.backward(f(upstream))
        runs.append({"out": out.detach(), "x": xr.grad, "w": wr.grad, "bias": None if br is None else br.grad})
    exact, magnitude, count = runs
    return {k: (exact[k], magnitude[k], None if count[k] is None else int(count[k].max())) for k in exact}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("train_base", [True, False])
def test_outputs_and_gradients_match_explicit_weight(kind, on, train_base, dtype):
    """Against the explicit layer in float64, each result within the rounding of its sums
    (gamma_n x the sum of |products|, whatever the order a kernel adds them in)."""
    torch.manual_seed(0)
    module = LAYERS[kind]().to(dtype)
    module.weight.requires_grad_(train_base)
    layer = single_task_layer(module, TAU)
    delta, score = layer.taps_delta["t"], layer.taps_score["t"]
    with torch.no_grad():
        delta.normal_()
        score.fill_(0.4 if on else 0.02)
    x = torch.randn(INPUTS[kind], dtype=dtype, requires_grad=True)

    out = layer(x)
    assert out.grad_fn is not None and "GatedLayer" in type(out.grad_fn).__name__  # the fused path ran
    upstream = torch.randn_like(out)
    out.backward(upstream)

    w = module.weight.detach() + (delta.detach() if on else 0)  # rounded as the layer rounds it
    ref = _reference(module, x, w, upstream)
    assert_rounding_close(out, *ref["out"], msg="output")
    assert_rounding_close(x.grad, *ref["x"], msg="dL/dx")
    grad_w, grad_w_magnitude, grad_w_terms = ref["w"]
    assert_rounding_close(delta.grad, grad_w * on, grad_w_magnitude * on, grad_w_terms, msg="dL/ddelta")
    delta64 = delta.detach().double()
    assert_rounding_close(score.grad, (grad_w * delta64).sum(), (grad_w_magnitude * delta64.abs()).sum(),
                          grad_w_terms + delta.numel(), msg="dL/ds")  # <dL/dw, delta>: one sum more
    assert delta.grad.dtype == dtype and score.grad.dtype == score.dtype == torch.float32  # scores stay fp32
    if train_base:
        assert_rounding_close(module.weight.grad, *ref["w"], msg="dL/dw_base")
        assert module.weight.grad.data_ptr() != delta.grad.data_ptr()
    else:
        assert module.weight.grad is None
    if module.bias is not None:
        assert_rounding_close(module.bias.grad, *ref["bias"], msg="dL/dbias")


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
    """Under bf16 autocast: bf16 compute, fp32 gradients, within bf16 rounding of the float64 values.
    Roundings to bf16 per product (u = 2^-9), fp32 sums adding well under one more: output = x, w,
    the output itself (3); dL/dw = x, dL/dout (the output, 3), dL/dw itself (5); dL/dx likewise
    (5); dL/ds = <dL/dw, delta> summed in fp32 (6)."""
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

    w = module.weight.detach() + delta.detach()
    x64, w64, b64, delta64 = (t.detach().double() for t in (x, w, module.bias, delta))
    exact = F.conv2d(x64, w64, b64, padding=1)
    magnitude = F.conv2d(x64.abs(), w64.abs(), b64.abs(), padding=1)
    bf16 = dict(dtype=torch.bfloat16)
    assert_rounding_close(out, exact, magnitude, terms=4, msg="output", **bf16)
    grad_w = torch.nn.grad.conv2d_weight(x64, w.shape, 2 * exact, padding=1)
    grad_w_magnitude = torch.nn.grad.conv2d_weight(x64.abs(), w.shape, 2 * magnitude, padding=1)
    assert_rounding_close(delta.grad, grad_w, grad_w_magnitude, terms=6, msg="dL/ddelta", **bf16)
    assert_rounding_close(x.grad, torch.nn.grad.conv2d_input(x.shape, w64, 2 * exact, padding=1),
                          torch.nn.grad.conv2d_input(x.shape, w64.abs(), 2 * magnitude, padding=1), terms=6,
                          msg="dL/dx", **bf16)
    assert_rounding_close(score.grad, (grad_w * delta64).sum(), (grad_w_magnitude * delta64.abs()).sum(), terms=7,
                          msg="dL/ds", **bf16)


@pytest.mark.parametrize("recompute", [True, False])
def test_whole_model_gradients_match_explicit_weights(recompute):
    """A ResNet-18 training step (joint mode, some layers off), with and without recomputing the
    weight, against autograd through explicit leaf weights ``w = w_base + I*delta``:
    ``dL/dw_base = dL/dw``, ``dL/ddelta = I dL/dw``, ``dL/ds = <dL/dw, delta>``; norms and head as usual.
    In float64 (BatchNorm and ReLU are no plain sums of products, so no rounding bound is written
    out): both sides' rounding, ~1e-16 of sums up to 2.4M terms, stays far under the 1e-7 tolerance."""
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    off = ("layer1.0.conv1", "layer3.1.conv2")
    model = tiny_resnet({"a": 3}, recompute_weight=recompute, freeze_base=False).double()
    assert all(layer.recompute_weight is recompute for _, layer in model.taps_layers())
    randomize_tasks(model, off=off)
    model.train()
    network, weights = explicit_task_network(model, "a")
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(network.train()(x), y).backward()

    close = dict(atol=1e-7, rtol=1e-7)
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
