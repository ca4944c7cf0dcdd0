"""Gated conv/linear that rebuild ``w_base + I(s) * delta`` in backward instead of saving it.

Composing the gated weight and then calling ``F.conv2d``/``F.linear`` makes autograd keep
one extra weight per active layer from forward until its backward (a whole model's worth of
weights at the start of backward): that is what made TAPS need about 1.3x the training
memory of fine-tuning in fp32. Here one autograd function runs the layer, saves only its
input plus the parameters it already holds, and re-adds ``base + delta`` in backward (one
extra add per active layer, a few percent of a step). Gradients are the TAPS ones:

* ``dL/dx`` through the gated weight, ``dL/dbias`` as usual;
* ``dL/dw_base = dL/dw`` (joint mode), ``dL/ddelta = I(s) * dL/dw``,
  ``dL/ds = <dL/dw, delta>`` (straight-through).

Autocast: the layer computes in the autocast dtype as ``F.conv2d`` would (input, weight and
bias cast to it), so the saved input is the low-precision one, and ``dL/dw`` is reduced in
fp32 for the score. Double backward is not supported (TAPS training never needs it).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CONV_TYPES
from .gate import compose_weight, known_gate_grads

__all__ = ["fusable", "gated_layer_forward"]



def fusable(layer: nn.Module) -> bool:
    """Exact ``nn.Conv1d/2d/3d`` (numeric padding) and ``nn.Linear``; subclasses keep their own forward."""
    kind = type(layer)
    if kind is nn.Linear:
        return True
    return kind in CONV_TYPES and not isinstance(layer.padding, str)


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _autocast_off(device: str):
    """Autocast must not re-cast what is cast here; entering a context only when it is on."""
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class _GatedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base, delta, score, bias, active, conv, dtype):
        ctx.active, ctx.conv, ctx.dtype = active, conv, dtype
        ctx.x_dtype, ctx.score_dtype, ctx.score_shape = x.dtype, score.dtype, score.shape
        x = _cast(x, dtype)
        weight = _cast(compose_weight(base, delta, active), dtype)
        with _autocast_off(x.device.type):
            if conv is None:
                out = F.linear(x, weight, _cast(bias, dtype))
            else:
                stride, padding, dilation, groups, output_padding = conv
                out = torch.convolution(x, weight, _cast(bias, dtype), stride, padding, dilation,
                                        False, output_padding, groups)
        ctx.save_for_backward(x, base, delta, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, base, delta, bias = ctx.saved_tensors
        need_x, need_base, need_delta, need_score, need_bias = ctx.needs_input_grad[:5]
        need_w = need_base or need_delta or need_score
        grad_out = _cast(grad_out, ctx.dtype)
        # convolution_backward reads the weight's layout even for dL/dw alone (first layers).
        rebuild = need_x or ctx.conv is not None
        weight = _cast(compose_weight(base, delta, ctx.active), ctx.dtype) if rebuild else None
        with _autocast_off(x.device.type):
            if ctx.conv is None:
                grad_x = grad_out @ weight if need_x else None
                out2d, x2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
                grad_w = out2d.t() @ x2d if need_w else None
                grad_b = out2d.sum(0) if need_bias else None
            else:
                stride, padding, dilation, groups, output_padding = ctx.conv
                grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
                    grad_out, x, weight, [bias.shape[0]] if bias is not None else None, stride, padding,
                    dilation, False, output_padding, groups, [need_x, need_w, need_bias])
        del weight
        grad_x = _cast(grad_x, ctx.x_dtype) if need_x else None
        grad_b = _cast(grad_b, bias.dtype) if need_bias else None
        grad_base = grad_delta = grad_score = None
        if need_w:
            grad_base, grad_delta, grad_score = known_gate_grads(
                grad_w.to(base.dtype), delta, ctx.active, need_base, need_delta, need_score,
                ctx.score_dtype, ctx.score_shape)
        return grad_x, grad_base, grad_delta, grad_score, grad_b, None, None, None


def gated_layer_forward(layer: nn.Module, x: Tensor, delta: Tensor, score: Tensor, active: bool) -> Tensor:
    """``layer(x)`` with its weight replaced by ``layer.weight + active * delta``, saving no weight."""
    base, bias = layer.weight, layer.bias
    if isinstance(layer, nn.Linear):
        return _GatedLayer.apply(x, base, delta, score, bias, bool(active), None, _compute_dtype(x))
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * len(layer.stride)
    conv = (tuple(layer.stride), tuple(padding), tuple(layer.dilation), layer.groups, (0,) * len(layer.stride))
    return _GatedLayer.apply(x, base, delta, score, bias, bool(active), conv, _compute_dtype(x))
