"""The TAPS gate: ``w = w_base + I(s >= tau) * delta`` with a straight-through score gradient.

One fused autograd function builds the gated weight, so the backward pass needs no
intermediate ``gate * delta`` tensor and the score gradient is a single reduction:

* ``dL/dw_base = dL/dw``                       (only when the base is trainable)
* ``dL/ddelta  = I(s >= tau) * dL/dw``          (an inactive delta receives zeros)
* ``dL/ds      = <dL/dw, delta>``               (straight-through: d(w_base + s*delta)/ds)

The hard gate is computed on the device (no host sync), so the function is safe inside
CUDA graphs, DDP and autocast; the score always stays in its own (fp32) dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hard_gate", "gated_weight"]


def hard_gate(score: Tensor, threshold: float) -> Tensor:
    """``I(score >= threshold)`` as a 0/1 tensor of ``score``'s dtype (no gradient)."""
    return (score.detach() >= threshold).to(score.dtype)


class _GatedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base: Tensor, delta: Tensor, score: Tensor, threshold: float) -> Tensor:
        gate = hard_gate(score, threshold)
        ctx.save_for_backward(delta, gate)
        return torch.addcmul(base, gate.to(delta.dtype), delta)

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        delta, gate = ctx.saved_tensors
        grad_base = grad_w if ctx.needs_input_grad[0] else None
        grad_delta = grad_w * gate.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        grad_score = None
        if ctx.needs_input_grad[2]:
            # Accumulate the inner product in fp32 so half-precision grads do not overflow.
            grad_score = (grad_w.float() * delta.float()).sum().to(gate.dtype).reshape(gate.shape)
        return grad_base, grad_delta, grad_score, None


def gated_weight(base: Tensor, delta: Tensor, score: Tensor, threshold: float) -> Tensor:
    """Return ``base + I(score >= threshold) * delta`` with the TAPS straight-through gradient.

    Args:
        base: the shared (pre-trained) weight.
        delta: the task-specific perturbation, same shape as ``base``.
        score: the scalar layer score ``s``.
        threshold: ``tau``; the layer is task-specific when ``s >= tau``.
    """
    return _GatedWeight.apply(base, delta, score, threshold)
