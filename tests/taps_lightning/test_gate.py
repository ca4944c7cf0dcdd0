"""The gated weight against explicit arithmetic: forward values and straight-through gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

import taps_lightning as tl
from tests.helpers import assert_rounding_close, exact_and_magnitude, single_task_layer

TAU = 0.1


def _wrapped_conv(score: float):
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = single_task_layer(conv, TAU)
    with torch.no_grad():
        layer.taps_delta["t"].normal_()
        layer.taps_score["t"].fill_(score)
    return layer


@pytest.mark.parametrize("score,on", [(0.15, True), (0.1, True), (0.05, False), (-0.3, False)])
def test_conv_forward_matches_explicit_weight(score, on):
    layer = _wrapped_conv(score)
    x = torch.randn(2, 3, 8, 8)
    base, delta = layer.base_layer.weight.detach(), layer.taps_delta["t"].detach()
    exact, magnitude = exact_and_magnitude(lambda x, w: F.conv2d(x, w, padding=1), x, base + delta if on else base)
    assert_rounding_close(layer(x), exact, magnitude, terms=27)  # 3 x 3 x 3 products per output
    layer.eval()
    with torch.no_grad():  # the inference path (cached merged weight) too
        assert_rounding_close(layer(x), exact, magnitude, terms=27)


@pytest.mark.parametrize("on", [True, False])
def test_linear_forward_matches_explicit_weight(on):
    lin = nn.Linear(6, 4)
    layer = single_task_layer(lin, TAU)
    with torch.no_grad():
        layer.taps_delta["t"].normal_()
        layer.taps_score["t"].fill_(0.5 if on else 0.0)
    x = torch.randn(5, 6)
    w = lin.weight.detach() + (layer.taps_delta["t"].detach() if on else 0)
    assert_rounding_close(layer(x), *exact_and_magnitude(F.linear, x, w, lin.bias), terms=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("on", [True, False])
def test_ste_gradients_match_explicit_leaf(on, dtype):
    """``dL/ddelta = I dL/dw`` and ``dL/ds = <dL/dw, delta>`` against the float64 explicit leaf.
    The score gradient sums 108 products whose sizes add up to ~300x the result, each a sum of
    128 (dL/dw) of sums of 27 (the output), so the allowed rounding is scaled to those magnitudes
    (``terms``: 27 + 1 for the residual + 128, + 108 for the score), never to the result."""
    layer = _wrapped_conv(0.3 if on else 0.02).to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    target = torch.randn(2, 4, 8, 8, dtype=dtype)
    (layer(x) - target).pow(2).sum().backward()

    gate = 1.0 if on else 0.0
    x64, target64, delta = x.double(), target.double(), layer.taps_delta["t"].detach().double()
    w = (layer.base_layer.weight.detach().double() + gate * delta).requires_grad_(True)
    (F.conv2d(x64, w, padding=1) - target64).pow(2).sum().backward()
    # magnitudes: |dL/dout| <= 2 (|x| * |w| + |target|), then dL/dw and <dL/dw, delta> on absolute values
    out_magnitude = F.conv2d(x64.abs(), w.detach().abs(), padding=1) + target64.abs()
    grad_w_magnitude = torch.nn.grad.conv2d_weight(x64.abs(), w.shape, 2 * out_magnitude, padding=1)

    assert layer.taps_score["t"].grad.dtype == dtype
    assert_rounding_close(layer.taps_score["t"].grad, (w.grad * delta).sum(), (grad_w_magnitude * delta.abs()).sum(),
                          terms=264, msg="score")
    assert_rounding_close(layer.taps_delta["t"].grad, gate * w.grad, gate * grad_w_magnitude, terms=156, msg="delta")
    assert layer.taps_score["t"].grad.abs() > 0  # an inactive layer still gets a score gradient: it can come back
    assert_rounding_close(layer.base_layer.weight.grad, w.grad, grad_w_magnitude, terms=156,  # trainable base (joint)
                          msg="base")


def test_frozen_base_gets_no_gradient():
    layer = _wrapped_conv(0.3)
    layer.base_layer.weight.requires_grad_(False)
    layer(torch.randn(1, 3, 4, 4)).sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.taps_delta["t"].grad is not None


def test_attention_block_matches_explicit_weights():
    torch.manual_seed(1)
    attn = Attention(dim=16, num_heads=2, qkv_bias=True).double()  # float64: softmax is no sum of products
    reference = copy.deepcopy(attn)
    names, _ = tl.inject_taps(attn, tl.TapsConfig(TAU, 0.15))
    assert set(names) == {"qkv", "proj"}
    deltas = {}
    for name in names:
        layer = attn.get_submodule(name)
        layer.add_task("t")
        layer.active_task = "t"
        with torch.no_grad():
            layer.taps_delta["t"].normal_(0, 0.1)
        deltas[name] = layer.taps_delta["t"].detach()
    with torch.no_grad():
        attn.proj.taps_score["t"].fill_(0.0)  # proj inactive: stays the base weight
        reference.qkv.weight.add_(deltas["qkv"])
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference(x))  # float64 noise is ~1e-16, the tolerance 1e-7


def test_scores_stay_fp32_and_gate_holds_under_bf16_autocast():
    layer = _wrapped_conv(0.3)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.taps_score["t"].dtype == torch.float32
    assert layer.taps_score["t"].grad.dtype == torch.float32
    # input and weight rounded to bf16, exact bf16 products summed in fp32 (27 x fp32's u, under
    # one bf16 u), the output rounded to bf16: at most 4 bf16 roundings per product
    exact, magnitude = exact_and_magnitude(lambda x, w: F.conv2d(x, w, padding=1), x,
                                           layer.base_layer.weight + layer.taps_delta["t"])
    assert_rounding_close(out, exact, magnitude, terms=4)


def test_generic_subclass_keeps_its_own_forward():
    from timm.layers import StdConv2d

    conv = StdConv2d(3, 4, 3, padding=1).double()  # float64: the standardisation is no sum of products
    layer = single_task_layer(conv, TAU)
    assert isinstance(layer, tl.TapsLayer)
    with torch.no_grad():
        layer.taps_delta["t"].normal_()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.add_(layer.taps_delta["t"])
    torch.testing.assert_close(layer(x), reference(x))  # weight standardisation still applied


def test_inference_cache_follows_in_place_updates():
    layer = _wrapped_conv(0.3)
    layer.eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        first = layer(x)
        layer.taps_delta["t"].mul_(2)  # an optimizer-style in-place update
        second = layer(x)
        layer.taps_score["t"].fill_(0.0)  # switched off
        third = layer(x)
    base = layer.base_layer.weight.detach()
    conv = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    assert_rounding_close(second, *exact_and_magnitude(conv, x, base + layer.taps_delta["t"]), terms=27)
    assert_rounding_close(third, *exact_and_magnitude(conv, x, base), terms=27)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("known", [True, False])
@pytest.mark.parametrize("on", [True, False])
def test_gated_weight_function_both_paths(known, on):
    base = torch.randn(4, 3, requires_grad=True)
    delta = torch.randn(4, 3, requires_grad=True)
    score = torch.tensor(0.3 if on else 0.0, requires_grad=True)
    upstream = torch.randn(4, 3)
    w = tl.gated_weight(base, delta, score, TAU, active=on if known else None)
    torch.testing.assert_close(w, base + delta if on else base)
    w.backward(upstream)
    torch.testing.assert_close(base.grad, upstream)
    torch.testing.assert_close(delta.grad, upstream if on else torch.zeros_like(upstream))
    assert_rounding_close(score.grad, *exact_and_magnitude(lambda u, d: (u * d).sum(), upstream, delta), terms=12)
    assert delta.grad.data_ptr() != base.grad.data_ptr()  # never one tensor for two parameters


@pytest.mark.parametrize("tau", [0.7, 0.01])
def test_score_equal_to_fp32_tau_is_active_everywhere(tau, tmp_path):
    """fp32(0.7) and fp32(0.01) lie below the decimals: a score equal to fp32(tau) must count as
    active in the forward, gate_states, count_params, save/load and merge alike."""
    import timm

    at_tau = torch.tensor(tau, dtype=torch.float32)
    assert at_tau.item() < tau  # the case that separates an fp32 from a float64 comparison
    below = torch.nextafter(at_tau, torch.tensor(-1.0))
    on, off = {"conv1", "layer2.0.conv2", "layer4.1.conv1"}, {"layer1.0.conv1", "layer3.0.downsample.0"}

    def make():
        torch.manual_seed(0)
        return tl.TapsModel(timm.create_model("resnet18", num_classes=0), {"t": 3}, threshold=tau)

    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=0).eval()  # reference: w_base + delta by hand
    model = make().eval()
    with torch.no_grad():
        for name, layer in model.taps_layers():
            layer.taps_delta["t"].normal_(0, 0.05)
            layer.taps_score["t"].copy_(at_tau if name in on else below if name in off else torch.tensor(-1.0))
            if name in on:
                plain.get_submodule(name).weight.add_(layer.taps_delta["t"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(model.forward_features(x), expected)  # inference path (cached weights)
    torch.testing.assert_close(model.forward_features(x).detach(), expected)  # gated path with gradients

    assert {n for n, active in tl.gate_states(model, "t").items() if active} == on
    counts = tl.count_params(model, "t")
    assert counts["active_layers"] == 3
    assert counts["delta_params"] == sum(plain.get_submodule(n).weight.numel() for n in on)

    path = tl.save_task(model, "t", tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert {k[len("delta."):] for k in f.keys() if k.startswith("delta.")} == on
    fresh = make().eval()
    fresh.remove_task("t")
    tl.load_task(fresh, path)
    fresh.set_task("t")
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(x), expected)
        merged = tl.merge(model, "t").eval()
        merged.fc = torch.nn.Identity()
        torch.testing.assert_close(merged(x), expected)
